"""Molecule graphs in the OGB on-disk format, read by OGB's own `PygGraphPropPredDataset`, offline.

* `write_ogb_dataset`: SMILES + labels -> the exact layout of an OGB graph-property dataset (`mapping/mol.csv.gz`,
  `raw/{edge,edge-feat,node-feat,num-node-list,num-edge-list,graph-label}.csv.gz`, `split/scaffold/*.csv.gz`,
  `RELEASE_v1.txt`), with features from `ogb.utils.smiles2graph` (the OGB encoding; PyG's `from_smiles` differs) and a
  deterministic Bemis-Murcko scaffold split (largest scaffold groups to train, as OGB/MoleculeNet).
  Unparsable SMILES are SKIPPED, each reported with its line number (never given another molecule's labels); the
  skipped lines are listed in `skipped_smiles.csv`; `on_invalid="raise"` rejects the file instead.
* `load_ogb_dataset`: OGB's loader for a real dataset (`ogbg-moltox21` under `root`) or a converted one, with the
  two fixes it needs offline on torch >= 2.6 (PyG classes allowed for `torch.load`, `RELEASE_v1.txt` present so it
  never prompts on stdin).
* `GraphPropertyDataset` / `GraphCollator`: a split of it for the `transformers.Trainer` (dict batches of tensors).
* `build_chembl_graph_tasks`: the offline default, from REAL measured affinities shipped in `MoleculeACE` (30 ChEMBL
  targets, Ki/EC50): a multi-task source (24 targets) and a held-out downstream (6 targets), active = <= 100 nM,
  NaN where a molecule was not measured on a target.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..files import cache_entry_problem, read_json, write_cache_manifest

logger = logging.getLogger(__name__)

OGB_META_FILE = "headprep_meta.json"
# Recorded in the meta file of every dataset `write_ogb_dataset` splits itself; cached offline conversions without it
# (written with the earlier tie order) are converted again, and sources pretrained on them trained again.
SCAFFOLD_SPLIT_RULE = "scaffold (MoleculeNet order: size, then first index, descending)"
# How the offline ChEMBL conversions number their molecules, recorded beside the split rule (`CHEMBL_SPLIT`): they were
# numbered target by target, and since nearly every scaffold group is a single molecule, ordered by that index, the
# split followed the targets: the downstream validation part held labels of 3 of the 6 targets and the test part of
# 4 others (one shared), so tau* was chosen on other targets than those it was tested on. Conversions and source models
# of the earlier numbering are converted and trained again.
CHEMBL_NUMBERING = "molecules in a seeded random order (numpy default_rng(0)), not target by target"
CHEMBL_SPLIT = f"{SCAFFOLD_SPLIT_RULE}; {CHEMBL_NUMBERING}"
SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}


# ---------------------------------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------------------------------


def murcko_scaffold(mol) -> str:
    """Bemis-Murcko scaffold SMILES of an RDKit molecule (chirality kept, as OGB/MoleculeNet)."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=True)


def scaffold_split(
    smiles: Sequence[str],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    scaffolds: Sequence[str] | None = None,
) -> dict[str, list]:
    """Deterministic Bemis-Murcko scaffold split, MoleculeNet's rule (the one OGB's molecule splits come from):
    scaffold groups sorted by size, largest first, groups of one size by their first molecule's index, highest first;
    each group joins train while train stays within 80%, else valid within 90%, else test; molecules sharing a
    scaffold stay in one split. `scaffolds` (one per molecule) skips re-parsing the SMILES.

    (Before `SCAFFOLD_SPLIT_RULE`, groups of one size went lowest index first: most of the singleton scaffolds that
    fill valid and test were others.)"""
    if scaffolds is None:
        from rdkit import Chem

        mols = [Chem.MolFromSmiles(s) for s in smiles]
        scaffolds = [murcko_scaffold(m) if m is not None else s for m, s in zip(mols, smiles)]
    groups: dict[str, list[int]] = {}
    for i, scaffold in enumerate(scaffolds):
        groups.setdefault(scaffold, []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)
    n = len(smiles)
    cut_train, cut_valid = fractions[0] * n, (fractions[0] + fractions[1]) * n
    split = {"train": [], "valid": [], "test": []}
    for group in ordered:
        if len(split["train"]) + len(group) <= cut_train:
            split["train"] += group
        elif len(split["train"]) + len(split["valid"]) + len(group) <= cut_valid:
            split["valid"] += group
        else:
            split["test"] += group
    return {k: sorted(v) for k, v in split.items()}


def check_split(split: Mapping[str, Sequence[int]], num_molecules: int) -> dict[str, list[int]]:
    """An explicit split of `num_molecules` as sorted lists, or a `ValueError` naming what is wrong with it: keys
    other than exactly `train`/`valid`/`test`, an empty part, indices that are not integers, repeated or out of range,
    or an index in two parts (a molecule's labels would leak from training into evaluation)."""
    parts = tuple(SPLIT_NAMES)
    if not isinstance(split, Mapping) or set(split) != set(parts):
        given = sorted(map(str, split)) if isinstance(split, Mapping) else type(split).__name__
        missing = sorted(set(parts) - set(split)) if isinstance(split, Mapping) else list(parts)
        unknown = sorted(map(str, set(split) - set(parts))) if isinstance(split, Mapping) else []
        raise ValueError(f"split keys must be exactly {list(parts)} (OGB's names), got {given}: missing {missing}, "
                         f"unknown {unknown}")  # fmt: skip
    checked = {}
    for part in parts:
        raw = split[part]
        values = np.asarray(raw)
        if values.size == 0:
            raise ValueError(f"split[{part!r}] is empty: every part needs at least one molecule")
        if values.ndim != 1 or values.dtype.kind not in "iu":
            listed = raw.tolist() if hasattr(raw, "tolist") else list(raw)
            bad = [v for v in listed if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
            raise ValueError(f"split[{part!r}]: indices must be integers (positions in smiles), these are not "
                             f"integers: {bad[:5] or listed[:5]}")  # fmt: skip
        repeated = sorted(int(v) for v, count in Counter(values.tolist()).items() if count > 1)
        if repeated:
            raise ValueError(f"split[{part!r}]: indices listed more than once: {repeated[:5]}")
        outside = sorted(int(v) for v in values if not 0 <= v < num_molecules)
        if outside:
            raise ValueError(f"split[{part!r}]: {len(outside)} indices out of range for {num_molecules} SMILES "
                             f"(0..{num_molecules - 1}): {outside[:5]}")  # fmt: skip
        checked[part] = sorted(int(v) for v in values)
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            shared = sorted(set(checked[a]) & set(checked[b]))
            if shared:
                raise ValueError(
                    f"split: {a} and {b} share {len(shared)} indices (first: {shared[:5]}); a molecule in two parts "
                    "leaks its labels into the evaluation: give each index to one part"
                )
    return checked


def _write_csv_gz(path: Path, rows: np.ndarray, fmt: str | None = None) -> None:
    import pandas as pd

    with gzip.open(path, "wt", compresslevel=6) as f:
        pd.DataFrame(rows).to_csv(f, header=False, index=False, float_format=fmt)


def write_ogb_dataset(
    smiles: Sequence[str],
    labels: np.ndarray,
    root: str | os.PathLike,
    name: str,
    task_type: str = "binary classification",
    task_names: Sequence[str] | None = None,
    on_invalid: str = "skip",
    split: dict[str, Sequence[int]] | None = None,
) -> Path:
    """Write molecules and labels as an OGB graph-property dataset `root/<name with '-' -> '_'>`.

    Args:
        smiles: One SMILES per molecule (line i of the input = `smiles[i - 1]`).
        labels: `(molecules, tasks)` floats; NaN = not measured. Binary tasks take 0/1.
        root: Dataset root (as OGB's `root=`).
        name: Dataset name, e.g. `"headprep-chembl-downstream"`.
        task_type: `"binary classification"` (eval metric ROC-AUC) or `"regression"` (RMSE).
        task_names: Column names of `mapping/mol.csv.gz` (default `task_0...`).
        on_invalid: `"skip"` (default: log each unparsable SMILES with its line number, drop it WITH its labels, list
            it in `skipped_smiles.csv`) or `"raise"` (`ValueError` naming the line).
        split: Indices into `smiles` per `train`/`valid`/`test` (disjoint, none empty); indices of skipped SMILES
            are dropped with a warning naming them. Default: scaffold split of the parsed molecules.

    Returns:
        The dataset folder (pass it to `load_ogb_dataset`).

    Raises:
        ValueError: labels not `(len(smiles), tasks)`, wrong task count for `task_names`, non-binary labels for a
            binary task, an unknown `task_type`, an invalid SMILES with `on_invalid="raise"`, no parsable SMILES, an
            invalid `split` (see `check_split`), or a split part left empty (a scaffold split where one scaffold
            dominates: pass `split=`). Nothing is written then.
        FileExistsError: the folder already holds a dataset (nothing is overwritten).
    """
    from ..ogb_compat import import_ogb

    import_ogb()
    from ogb.utils import smiles2graph
    from rdkit import Chem, RDLogger

    if task_type not in ("binary classification", "regression"):
        raise ValueError(f"task_type must be 'binary classification' or 'regression', got {task_type!r}")
    if on_invalid not in ("skip", "raise"):
        raise ValueError(f"on_invalid must be 'skip' or 'raise', got {on_invalid!r}")
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != len(smiles):
        raise ValueError(f"labels must have shape ({len(smiles)}, tasks) for {len(smiles)} SMILES, got {labels.shape}")
    task_names = list(task_names) if task_names is not None else [f"task_{t}" for t in range(labels.shape[1])]
    if len(task_names) != labels.shape[1]:
        raise ValueError(f"{len(task_names)} task names for labels with {labels.shape[1]} tasks")
    if task_type == "binary classification":
        bad = ~np.isnan(labels) & (labels != 0) & (labels != 1)
        if bad.any():
            i, t = (int(v[0]) for v in np.nonzero(bad))
            raise ValueError(
                f"line {i + 1}: label {labels[i, t]} for task {task_names[t]!r}; binary tasks take 0/1/NaN"
            )
    if split is not None:
        split = check_split(split, len(smiles))
    folder = Path(root) / name.replace("-", "_")
    if (folder / "raw").exists() or (folder / "processed").exists():
        raise FileExistsError(f"{folder} already holds a dataset; remove it or choose another name/root")

    graphs, kept, skipped, scaffolds = [], [], [], []
    RDLogger.DisableLog("rdApp.*")
    try:
        for i, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s) if isinstance(s, str) and s else None
            if mol is None or mol.GetNumAtoms() == 0:
                message = f"line {i + 1}: cannot parse SMILES {s!r}"
                if on_invalid == "raise":
                    raise ValueError(message + " (on_invalid='raise'); fix or remove the line")
                logger.warning("%s: skipped with its labels", message)
                skipped.append((i + 1, s))
                continue
            graphs.append(smiles2graph(s))
            kept.append(i)
            if split is None:
                scaffolds.append(murcko_scaffold(mol))
    finally:
        RDLogger.EnableLog("rdApp.*")
    if not graphs:
        first = ", ".join(f"line {i + 1}: {s!r}" for i, s in enumerate(smiles[:3]))
        raise ValueError(
            f"no parsable SMILES among {len(smiles)} entries for {name!r} (RDKit's Chem.MolFromSmiles failed on each; "
            f"{first}): give one SMILES per molecule; read_smiles_and_labels takes the first field of each line "
            "(separated by whitespace, a comma or a tab)"
        )
    kept_smiles = [smiles[i] for i in kept]
    kept_labels = labels[kept]
    scaffold_split_used = split is None
    if split is None:
        split = scaffold_split(kept_smiles, scaffolds=scaffolds)
        sizes = {k: len(v) for k, v in split.items()}
        empty = [k for k, v in sizes.items() if v == 0]
        if empty:
            scaffold, size = Counter(scaffolds).most_common(1)[0]
            share = 0.1 * len(kept)  # (molecules in the valid and test shares)
            if share >= 1 and size > share:  # (a group larger than those shares took their room)
                why = (f"its largest scaffold group ({scaffold!r}{'' if scaffold else ': acyclic molecules'}) holds "
                       f"{size} molecules, and whole groups fill train, then valid, then test")  # fmt: skip
            else:
                why = (f"{len(kept)} molecules are too few for whole scaffold groups to fill 80% train, 10% valid and "
                       "10% test")  # fmt: skip
            raise ValueError(
                f"scaffold split: {' and '.join(empty)} is empty (train {sizes['train']}, valid {sizes['valid']}, "
                f"test {sizes['test']} of {len(kept)}): {why}; OGB cannot read an empty split file. Pass "
                "write_ogb_dataset(..., split={'train': [...], 'valid': [...], 'test': [...]}) with indices into "
                "smiles"
            )
    else:
        position = {orig: new for new, orig in enumerate(kept)}
        dropped = {k: [i for i in v if i not in position] for k, v in split.items()}
        if any(dropped.values()):
            logger.warning("split: indices of skipped SMILES dropped from it: %s",
                           ", ".join(f"{k} {v}" for k, v in dropped.items() if v))  # fmt: skip
        split = {k: [position[i] for i in v if i in position] for k, v in split.items()}
        empty = [k for k, v in split.items() if not v]
        if empty:
            raise ValueError(f"split: {' and '.join(empty)} holds only skipped (unparsable) SMILES: {dropped}; "
                             "fix those lines or give the part other molecules")  # fmt: skip

    (folder / "raw").mkdir(parents=True)
    (folder / "mapping").mkdir()
    (folder / "split" / "scaffold").mkdir(parents=True)
    # OGB stores every bond once (its loader re-adds the reverse edge, add_inverse_edge=True); smiles2graph lists
    # each bond as (i, j), (j, i), so the even positions are the stored direction.
    edges = np.concatenate([g["edge_index"][:, 0::2].T for g in graphs]).astype(np.int64)
    edge_feat = np.concatenate([g["edge_feat"][0::2] for g in graphs]).astype(np.int64)
    node_feat = np.concatenate([g["node_feat"] for g in graphs]).astype(np.int64)
    _write_csv_gz(folder / "raw" / "edge.csv.gz", edges.reshape(-1, 2))
    _write_csv_gz(folder / "raw" / "edge-feat.csv.gz", edge_feat.reshape(-1, 3))
    _write_csv_gz(folder / "raw" / "node-feat.csv.gz", node_feat)
    _write_csv_gz(folder / "raw" / "num-node-list.csv.gz", np.array([g["num_nodes"] for g in graphs])[:, None])
    num_bonds = np.array([g["edge_index"].shape[1] // 2 for g in graphs])
    _write_csv_gz(folder / "raw" / "num-edge-list.csv.gz", num_bonds[:, None])
    _write_csv_gz(folder / "raw" / "graph-label.csv.gz", kept_labels, fmt="%.6g")
    import pandas as pd

    mapping = pd.DataFrame(kept_labels, columns=task_names)
    mapping["smiles"] = kept_smiles
    mapping["mol_id"] = [f"line_{i + 1}" for i in kept]
    with gzip.open(folder / "mapping" / "mol.csv.gz", "wt") as f:
        mapping.to_csv(f, index=False)
    for part in ("train", "valid", "test"):
        _write_csv_gz(
            folder / "split" / "scaffold" / f"{part}.csv.gz", np.asarray(split[part], dtype=np.int64)[:, None]
        )
    (folder / "RELEASE_v1.txt").write_text("written by headprep_hf.data.graphs.write_ogb_dataset\n")
    if skipped:
        pd.DataFrame(skipped, columns=["line", "smiles"]).to_csv(folder / "skipped_smiles.csv", index=False)
    binary = task_type == "binary classification"
    meta = {
        "num tasks": labels.shape[1], "eval metric": "rocauc" if binary else "rmse", "download_name": folder.name,
        "version": 1, "url": "", "add_inverse_edge": "True", "data type": "mol", "has_node_attr": "True",
        "has_edge_attr": "True", "task type": task_type, "num classes": 2 if binary else -1, "split": "scaffold",
        "headprep_split": SCAFFOLD_SPLIT_RULE if scaffold_split_used else "given",
        "additional node files": "None", "additional edge files": "None", "binary": "False",
    }  # fmt: skip
    (folder / OGB_META_FILE).write_text(json.dumps({"name": name, **meta}, indent=1))
    return folder


def read_smiles_and_labels(smiles_file: str, labels_file: str, num_tasks: int) -> tuple[list[str], np.ndarray]:
    """A SMILES file (one molecule per line: the SMILES is the first field, further fields separated by whitespace, a
    comma or a tab are ignored: `.smi`/`.txt`/`.csv`/`.tsv` without header) and a label CSV without header (one row
    per molecule, `num_tasks` comma-separated values, empty or `nan` = missing).

    Raises `ValueError` naming the line of a row with the wrong number of tasks or a non-numeric value, or when the
    two files have different numbers of lines."""
    with open(smiles_file) as f:
        # (SMILES hold no whitespace, commas or tabs; a quoted CSV field loses its quotes)
        smiles = [re.split(r"[\s,]+", line.strip(), maxsplit=1)[0].strip("\"'") for line in f.read().splitlines()]
    labels = []
    with open(labels_file) as f:
        for number, line in enumerate(f.read().splitlines(), start=1):
            values = line.split(",")
            if len(values) != num_tasks:
                raise ValueError(
                    f"{labels_file} line {number}: {len(values)} values, expected {num_tasks} (one per task); "
                    "a missing label is an empty field or nan"
                )
            try:
                labels.append([float(v) if v.strip() else float("nan") for v in values])
            except ValueError:
                raise ValueError(f"{labels_file} line {number}: non-numeric label in {line!r}") from None
    if len(labels) != len(smiles):
        raise ValueError(f"{smiles_file} has {len(smiles)} lines but {labels_file} has {len(labels)}; one row each")
    return smiles, np.asarray(labels, dtype=np.float64).reshape(len(labels), num_tasks)


# ---------------------------------------------------------------------------------------------------------------------
# Loading through OGB
# ---------------------------------------------------------------------------------------------------------------------


def load_ogb_dataset(name_or_path: str, root: str | os.PathLike | None = None):
    """OGB's `PygGraphPropPredDataset` for an official dataset name under `root` (e.g. `ogbg-moltox21`; OGB downloads
    it when the files are missing and the network is there) or for a folder written by `write_ogb_dataset` (its path,
    or its name with `root`, as `write_ogb_dataset(..., root, name)` took them).

    Offline fixes: PyG's data classes are allowed for `torch.load(weights_only=True)` while OGB loads its processed
    file, and an official dataset folder without `RELEASE_v1.txt` (OGB would ask on stdin whether to delete it) is a
    clear error instead.
    """
    from ..ogb_compat import import_ogb

    import_ogb()
    from ogb.graphproppred import PygGraphPropPredDataset
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    path = Path(name_or_path)
    if root is not None and not (path / OGB_META_FILE).is_file():
        converted = Path(root) / name_or_path.replace("-", "_")
        if (converted / OGB_META_FILE).is_file():
            # (write_ogb_dataset(..., root, name) named as OGB names its own sets; OGB's own loader answered "Invalid
            # dataset name" for it, without naming the folder)
            path = converted
    if (path / OGB_META_FILE).is_file():
        meta = read_json(path / OGB_META_FILE)
        name = meta.pop("name")
        kwargs = dict(name=name, meta_dict={**meta, "dir_path": str(path)})
    else:
        if root is None:
            raise ValueError(
                f"{name_or_path!r} is neither a folder written by write_ogb_dataset nor usable without dataset_root; "
                "pass dataset_root (the folder that holds e.g. ogbg_moltox21/)"
            )
        folder = Path(root) / name_or_path.replace("-", "_")
        if folder.is_dir() and not (folder / "RELEASE_v1.txt").is_file() and not _holds_files(folder):
            # (what a failed download left, an empty `raw/`, before such folders were removed: OGB would prompt on
            # stdin for it, and it holds nothing to lose)
            shutil.rmtree(folder)
        if folder.is_dir() and not (folder / "RELEASE_v1.txt").is_file():
            raise FileNotFoundError(
                f"{folder} has no RELEASE_v1.txt, so OGB would prompt on stdin to delete and re-download it. If the "
                "files are from the current OGB release, create the empty file RELEASE_v1.txt there."
            )
        kwargs = dict(name=name_or_path, root=str(root))
    import urllib.error

    target = Path(kwargs.get("root", "")) / name_or_path.replace("-", "_")
    existed = target.exists()
    try:
        with torch.serialization.safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage]):
            return PygGraphPropPredDataset(**kwargs)
    except urllib.error.URLError as error:  # urlopen wraps connection failures in URLError
        folder = target
        if not existed and "root" in kwargs:
            # (PyG made `raw/` before the download failed: every later call, online too, was then told to create
            # RELEASE_v1.txt in it; the folder is this call's, so it goes)
            shutil.rmtree(folder, ignore_errors=True)
        raise FileNotFoundError(
            f"{name_or_path} is not under {folder} and OGB could not download it ({error}). Offline, place the "
            f"extracted OGB files there (raw/, split/, mapping/ and RELEASE_v1.txt) or convert SMILES with "
            "write_ogb_dataset."
        ) from None


def _holds_files(folder: Path) -> bool:
    return any(p.is_file() for p in folder.rglob("*"))


class GraphPropertyDataset(Dataset):
    """A split of an OGB dataset for the Trainer: items are PyG `Data` with `y` of shape `(1, tasks)`.

    Attributes:
        labels: float numpy array `(N, tasks)` (NaN = missing), read once for the label checks.
        num_tasks: number of tasks.
    """

    def __init__(self, ogb_dataset, indices: Sequence[int] | torch.Tensor):
        self.dataset = ogb_dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        # The rows of the storage these items read: a dataset that is itself a view (`ds[idx]`, `ds.shuffle()`)
        # maps its indices to storage rows first (indexing the storage directly paired other graphs' labels).
        self._rows = torch.as_tensor(list(ogb_dataset.indices()), dtype=torch.long)[self.indices]
        self.labels = self._storage().y[self._rows].double().numpy()
        self.num_tasks = int(self.labels.shape[1])

    def _storage(self):
        return self.dataset._data if hasattr(self.dataset, "_data") else self.dataset.data

    def content_digest(self) -> str:
        """sha256 of the graphs these items read (the storage's node features, edges and edge features, and which of
        its graphs): the sweep fingerprint's `content`, which tells two datasets of one length and labels apart."""
        import hashlib

        return hashlib.sha256(self._rows.numpy().tobytes() + self._storage_digest().encode()).hexdigest()

    def _storage_digest(self) -> str:
        # Once per dataset (its splits share the storage; ogbg-molpcba's is about 1.8 GB), without copying it.
        import hashlib

        storage = self._storage()
        cached = getattr(self.dataset, "_headprep_storage_digest", None)
        if cached is not None and cached[0] is storage:  # (PyG's `copy()` copies the attribute, not the storage)
            return cached[1]
        digest = hashlib.sha256()
        for key in ("x", "edge_index", "edge_attr"):
            value = getattr(storage, key, None)
            if isinstance(value, torch.Tensor):
                digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
                digest.update(value.detach().cpu().contiguous().numpy())  # (its buffer: no copy)
        self.dataset._headprep_storage_digest = (storage, digest.hexdigest())
        return self.dataset._headprep_storage_digest[1]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[int(index)])]


def ogb_splits(ogb_dataset) -> dict[str, GraphPropertyDataset]:
    """`train` / `validation` / `test` from the dataset's own split (OGB's `get_idx_split`)."""
    split = ogb_dataset.get_idx_split()
    return {SPLIT_NAMES[k]: GraphPropertyDataset(ogb_dataset, v) for k, v in split.items()}


def _check_graph(graph, position: int) -> None:
    """A graph the GCN can take (OGB's `smiles2graph` layout), else a `ValueError` naming what is missing: the model's
    own errors (`'NoneType' object has no attribute 'shape'`) name neither the graph nor the field."""
    problems = []
    for key in ("x", "edge_attr"):
        value = getattr(graph, key, None)
        if not isinstance(value, torch.Tensor):
            problems.append(f"no {key}")
        elif value.dim() != 2 or value.is_floating_point():
            problems.append(f"{key} of shape {tuple(value.shape)} and dtype {value.dtype} (integer features, 2-D)")
    edge_index = getattr(graph, "edge_index", None)
    if not isinstance(edge_index, torch.Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        problems.append("no edge_index of shape (2, edges)")
    if getattr(graph, "y", None) is None:
        problems.append("no y (the labels, NaN where missing)")
    if problems:
        raise ValueError(
            f"GraphCollator: graph {position} of the batch has {'; '.join(problems)}. The GCN takes OGB's molecule "
            "graphs: integer node features x and edge features edge_attr as `ogb.utils.smiles2graph` gives them, and "
            "labels y of shape (1, tasks) (see headprep_hf.data.graphs.write_ogb_dataset)."
        )


class GraphCollator:
    """PyG graphs -> `{"x", "edge_index", "edge_attr", "batch", "ptr", "labels"}` (labels float `(graphs, tasks)`,
    NaN = missing), the batch `headprep_hf.models.GCN` takes."""

    def __call__(self, graphs: list) -> dict[str, torch.Tensor]:
        from torch_geometric.data import Batch

        for i, graph in enumerate(graphs):
            _check_graph(graph, i)
        batch = Batch.from_data_list(graphs)
        return {
            "x": batch.x,
            "edge_index": batch.edge_index,
            "edge_attr": batch.edge_attr,
            "batch": batch.batch,
            "ptr": batch.ptr,
            "labels": batch.y.reshape(len(graphs), -1).float(),
        }


# ---------------------------------------------------------------------------------------------------------------------
# The offline default: ChEMBL affinities shipped in MoleculeACE
# ---------------------------------------------------------------------------------------------------------------------

# Held out for the downstream task (the rest pretrain the source model): six targets of 630-970 molecules.
DOWNSTREAM_TARGETS = (
    "CHEMBL1862_Ki", "CHEMBL1871_Ki", "CHEMBL2034_Ki", "CHEMBL2047_EC50", "CHEMBL231_Ki", "CHEMBL262_Ki",
)  # fmt: skip
ACTIVE_NM = 100.0


def moleculeace_folder() -> Path:
    """The folder of MoleculeACE's benchmark CSVs, found without importing MoleculeACE (whose import pulls in
    packages we do not need). Install it with `pip install --no-deps MoleculeACE` (its `rdkit-pypi` pin would
    replace a current RDKit)."""
    import importlib.util

    spec = importlib.util.find_spec("MoleculeACE")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the offline molecule data ships in MoleculeACE: pip install --no-deps MoleculeACE")
    folder = Path(next(iter(spec.submodule_search_locations))) / "Data" / "benchmark_data"
    if not folder.is_dir():
        raise FileNotFoundError(f"MoleculeACE is installed but {folder} is missing")
    return folder


def chembl_activity_matrix(targets: Sequence[str], exclude: set[str] = frozenset()) -> tuple[list[str], np.ndarray]:
    """SMILES and a `(molecules, targets)` 0/1/NaN matrix: 1 = measured Ki/EC50 <= 100 nM, 0 = measured and weaker,
    NaN = not measured on that target. Molecules in `exclude` are left out."""
    import pandas as pd

    folder = moleculeace_folder()
    index: dict[str, int] = {}
    entries = []
    for t, target in enumerate(targets):
        table = pd.read_csv(folder / f"{target}.csv")
        for s, value in zip(table["smiles"], table["exp_mean [nM]"]):
            if s in exclude:
                continue
            i = index.setdefault(s, len(index))
            entries.append((i, t, 1.0 if value <= ACTIVE_NM else 0.0))
    labels = np.full((len(index), len(targets)), np.nan)
    for i, t, v in entries:
        labels[i, t] = v
    order = np.random.default_rng(0).permutation(len(index))  # (`CHEMBL_NUMBERING`: not target by target)
    smiles = list(index)
    return [smiles[i] for i in order], labels[order]


def _conversion_problem(folder: Path) -> str | None:
    """Why a cached offline ChEMBL conversion cannot be used (None: it can): files that differ from its manifest
    (damaged, incomplete, or of an earlier version: OGB trusts its processed file, where one flipped bit turned a
    carbon atom into a boron one), or a split or numbering of an earlier rule."""
    problem = cache_entry_problem(folder)
    if problem is not None:
        return problem
    if not _current_chembl_conversion(folder):
        return ("it was split by an earlier headprep_hf rule (scaffold groups of one size in another order, or "
                "molecules numbered target by target)")  # fmt: skip
    return None


def _remove_stale_conversion(folder: Path, reason: str) -> None:
    """Remove a cached conversion that cannot be used (`reason`). It is renamed away first and judged after: another
    process sharing the cache may have replaced it with a good one since this one looked, which is put back."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
    try:
        try:
            os.replace(folder, aside / "data")
        except FileNotFoundError:
            return  # (another process moved it first)
        if _conversion_problem(aside / "data") is None:
            try:
                os.replace(aside / "data", folder)
            except OSError:
                pass  # (a third process published a current one meanwhile: it stays)
            return
        logger.warning("The cached conversion %s is not used: %s. Converting it again.", folder, reason)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _current_chembl_conversion(folder: Path) -> bool:
    """Whether a cached offline ChEMBL conversion holds the current split and numbering (`CHEMBL_SPLIT`)."""
    meta = json.loads((folder / OGB_META_FILE).read_text())
    return converted_with_current_split(folder) and meta.get("headprep_numbering") == CHEMBL_NUMBERING


def converted_with_current_split(folder: str | os.PathLike) -> bool:
    """Whether a folder `write_ogb_dataset` wrote holds a split of the current rule (`SCAFFOLD_SPLIT_RULE`) or one
    its caller gave."""
    meta = json.loads((Path(folder) / OGB_META_FILE).read_text())
    return meta.get("headprep_split") in (SCAFFOLD_SPLIT_RULE, "given")


def all_chembl_targets() -> list[str]:
    return sorted(p.stem for p in moleculeace_folder().glob("CHEMBL*.csv"))


def build_chembl_graph_tasks(
    cache_dir: str | os.PathLike, parts: Sequence[str] = ("downstream", "source"), source_molecules: int | None = None
) -> dict[str, Path]:
    """Convert (once, cached) the offline source and downstream tasks to OGB folders under `cache_dir/ogb`.

    * `source`: the 24 targets not in `DOWNSTREAM_TARGETS`, multi-task (NaN where not measured), without the
      downstream molecules (the paper's Sup-pcba role);
    * `downstream`: the 6 held-out targets (the Tox21 role): binary, missing labels, scaffold split.

    Args:
        parts: Which of the two to convert (a conversion is the costly part: about 30k source molecules).
        source_molecules: Convert only a seeded random sample of this many source molecules (its own folder,
            `headprep_chembl_source_sub<N>`, with its own scaffold split), for quick source pretraining.

    Returns `{part: folder}` for `load_ogb_dataset`.
    """
    root = Path(cache_dir) / "ogb"
    folders = {}
    downstream_smiles, downstream_labels = chembl_activity_matrix(DOWNSTREAM_TARGETS)
    source_targets = [t for t in all_chembl_targets() if t not in DOWNSTREAM_TARGETS]

    def source():
        smiles, labels = chembl_activity_matrix(source_targets, set(downstream_smiles))
        if source_molecules is None or source_molecules >= len(smiles):
            return smiles, labels
        keep = np.sort(np.random.default_rng(0).choice(len(smiles), size=source_molecules, replace=False))
        return [smiles[i] for i in keep], labels[keep]

    sub = "" if source_molecules is None else f"-sub{source_molecules}"
    plans = {
        "downstream": (
            "headprep-chembl-downstream",
            lambda: (downstream_smiles, downstream_labels),
            DOWNSTREAM_TARGETS,
        ),
        "source": (f"headprep-chembl-source{sub}", source, source_targets),
    }
    unknown = sorted(set(parts) - set(plans))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}: choose from {sorted(plans)}")
    for key, (name, make, targets) in ((k, plans[k]) for k in parts):
        folder = root / name.replace("-", "_")
        problem = _conversion_problem(folder) if folder.exists() else None
        if problem is not None:
            _remove_stale_conversion(folder, problem)
        if not folder.exists():
            # In a folder of this process's own (two processes sharing the cache, e.g. two sweep shards, each wrote
            # into one shared `.partial` and removed the other's); the first complete copy published is kept.
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
            try:
                smiles, labels = make()
                written = write_ogb_dataset(smiles, labels, tmp, name, task_names=list(targets))
                meta = json.loads((written / OGB_META_FILE).read_text())
                (written / OGB_META_FILE).write_text(json.dumps({**meta, "headprep_numbering": CHEMBL_NUMBERING}))
                load_ogb_dataset(str(written))  # (OGB writes its processed file now, so that the manifest holds it)
                write_cache_manifest(written)
                try:
                    os.replace(written, folder)  # a cache entry is complete or absent
                except OSError:
                    if not folder.is_dir():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        folders[key] = folder
    return folders
