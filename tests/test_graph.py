"""Graphs: GCN (OGB encoders) through the trainer, masked BCE / MSE with NaN = missing, ROC-AUC with OGB semantics,
the OGB-format converter read back by OGB's own loader, offline."""

import json
import logging
import math
import os
import re

import numpy as np
import pytest
import torch
from conftest import SMILES, clone_state, graph_labels, make_config, tiny_gcn, tiny_graph_data

from headprep_hf import HeadPrepTrainer
from headprep_hf.data.graphs import GraphCollator, load_ogb_dataset, read_smiles_and_labels, write_ogb_dataset
from headprep_hf.losses import masked_bce_with_logits, masked_mse, multilabel_energy, regression_energy


def _config(tmp_path, **overrides):
    values = dict(per_device_train_batch_size=8, per_device_eval_batch_size=8, drift_probe_samples=10)
    return make_config(tmp_path, **{**values, **overrides})


def _trainer(tmp_path, model, splits, **overrides):
    from headprep_hf.metrics import graph_metrics

    return HeadPrepTrainer(
        model=model, args=_config(tmp_path, **overrides), train_dataset=splits["train"],
        eval_dataset=splits["validation"], data_collator=GraphCollator(), compute_metrics=graph_metrics(),
    )  # fmt: skip


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_hp_freezes_the_gcn_body_and_ft_moves_it(tmp_path, head_type):
    _, splits = tiny_graph_data(tmp_path / "data")
    model = tiny_gcn()
    trainer = _trainer(tmp_path, model, splits, hp_epochs=3, num_train_epochs=2, learning_rate=1e-2,
                       head_type=head_type, mlp_hidden_size=8)  # fmt: skip
    before = clone_state(model.state_dict())
    assert trainer.split.head_names == ["classifier"] and trainer.problem_type == "multi_label_classification"
    trainer.probe_head()
    after_hp = clone_state(model.state_dict())
    body = [k for k in before if not k.startswith("classifier.")]
    assert any(k.endswith("running_mean") for k in body)  # BatchNorm buffers are part of the check
    assert all(torch.equal(before[k], after_hp[k]) for k in body)
    head = [k for k in before if k.startswith("classifier.")]
    assert len(head) == (2 if head_type == "linear" else 4)  # the MLP replaces the linear head: two layers
    assert all(not torch.equal(before[k], after_hp[k]) for k in head if k.endswith("weight"))
    trainer.finetune()
    moved = [k for k in body if not torch.equal(after_hp[k], model.state_dict()[k])]
    assert "convs.0.linear.weight" in moved and "atom_encoder.atom_embedding_list.0.weight" in moved
    assert len(trainer.dynamics["drift"]) >= 1 and trainer.dynamics["drift"][-1]["sq_dist"] > 0


def test_masked_bce_and_energy_ignore_missing_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    labels = torch.tensor(graph_labels(6, 4, seed=1), dtype=torch.float32)
    labels[5] = float("nan")  # a graph without any label
    eps = 0.2
    loss = masked_bce_with_logits(logits, labels, smoothing=eps)
    present = ~torch.isnan(labels)
    # Independent: per present entry -[t log s + (1 - t) log(1 - s)], t = y (1 - eps) + eps / 2.
    s = torch.sigmoid(logits.detach().double())
    t = labels.double() * (1 - eps) + eps / 2
    expected = -(t * s.log() + (1 - t) * (1 - s).log())[present].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[~present] == 0) and torch.all(logits.grad[present] != 0)

    stats = multilabel_energy(logits.detach(), labels)
    for i in range(6):
        p = present[i]
        if not p.any():
            assert math.isnan(stats["energy"][i]) and stats["count"][i] == 0
            continue
        e = (torch.sigmoid(logits[i, p].detach()) - labels[i, p]).norm()
        assert stats["energy"][i].item() == pytest.approx(e.item(), rel=1e-6) and stats["count"][i] == 1
    # NaN labels never leak: changing the logits of missing entries changes neither loss nor energy.
    moved = logits.detach().clone()
    moved[~present] += 5.0
    assert masked_bce_with_logits(moved, labels, eps).item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(multilabel_energy(moved, labels)["energy"], stats["energy"], equal_nan=True)

    mse = masked_mse(logits.detach(), labels)
    assert mse.item() == pytest.approx(((logits.detach() - labels)[present] ** 2).mean().item(), rel=1e-6)
    reg = regression_energy(logits.detach(), labels)
    assert reg["energy"][0].item() == pytest.approx((logits[0] - labels[0])[present[0]].norm().item(), rel=1e-6)


def test_roc_auc_matches_the_ogb_evaluator():
    from headprep_hf.metrics import graph_metrics, multitask_rmse
    from headprep_hf.ogb_compat import import_ogb

    import_ogb()
    from ogb.graphproppred import Evaluator
    from transformers import EvalPrediction

    rng = np.random.default_rng(0)
    y = graph_labels(80, 12, seed=3, missing=0.4)
    y[:, 7] = np.where(np.isnan(y[:, 7]), np.nan, 1.0)  # a task with one class only: skipped, as OGB does
    scores = rng.normal(size=y.shape) + 0.8 * np.nan_to_num(y)
    ours = graph_metrics()(EvalPrediction(predictions=scores, label_ids=y))
    expected = Evaluator("ogbg-moltox21").eval({"y_true": y, "y_pred": scores})["rocauc"]
    assert ours["roc_auc"] == pytest.approx(expected, abs=1e-12)
    assert multitask_rmse(y[:, :1], scores[:, :1]) == pytest.approx(
        Evaluator("ogbg-molesol").eval({"y_true": y[:, :1], "y_pred": scores[:, :1]})["rmse"], abs=1e-12
    )
    # A diverged model's NaN outputs: every metric NaN (its accuracy was the share of negative labels, NaN > 0 being
    # false, and the warning blamed a split without both classes).
    diverged = graph_metrics()(EvalPrediction(predictions=np.full_like(scores, np.nan), label_ids=y))
    assert all(math.isnan(v) for v in diverged.values()) and set(diverged) == {"roc_auc", "ap", "accuracy"}
    assert math.isnan(graph_metrics("regression")(EvalPrediction(predictions=scores * np.inf, label_ids=y))["rmse"])


def test_trainer_energy_matches_an_independent_computation(tmp_path):
    _, splits = tiny_graph_data(tmp_path / "data", seed=2)
    model = tiny_gcn(seed=1)
    trainer = _trainer(tmp_path, model, splits, hp_epochs=2)
    trainer.probe_head()
    model.eval()
    energies, correct = [], []
    with torch.no_grad():
        for i in range(len(splits["train"])):
            batch = GraphCollator()([splits["train"][i]])
            y = batch.pop("labels")[0]
            q = model(**batch)["logits"][0]
            p = ~torch.isnan(y)
            energies.append((torch.sigmoid(q[p]) - y[p]).norm().item())
            correct.append(((q[p] > 0) == (y[p] > 0.5)).double().mean().item())
    assert trainer.dynamics["energy"] == pytest.approx(float(np.mean(energies)), rel=1e-5)
    assert trainer.dynamics["hp_train_accuracy"] == pytest.approx(float(np.mean(correct)), rel=1e-5)


def test_converter_round_trips_through_the_real_ogb_loader(tmp_path):
    from headprep_hf.ogb_compat import import_ogb

    import_ogb()
    from ogb.utils import smiles2graph

    labels = graph_labels(len(SMILES), 12, seed=4)
    # Named like the real dataset: OGB reads it through master.csv (no meta_dict), i.e. the exact official layout.
    folder = write_ogb_dataset(SMILES, labels, tmp_path, "ogbg-moltox21")
    assert folder.name == "ogbg_moltox21" and (folder / "RELEASE_v1.txt").is_file()
    dataset = load_ogb_dataset("ogbg-moltox21", root=tmp_path)
    assert len(dataset) == len(SMILES) and dataset.num_tasks == 12
    for i, s in enumerate(SMILES):
        graph, ref = dataset[i], smiles2graph(s)
        assert torch.equal(graph.x, torch.from_numpy(ref["node_feat"]))
        assert torch.equal(graph.edge_index, torch.from_numpy(ref["edge_index"]))
        assert torch.equal(graph.edge_attr, torch.from_numpy(ref["edge_feat"]))
        np.testing.assert_array_equal(graph.y.numpy()[0], labels[i].astype(np.float32))  # NaN stays NaN
    split = dataset.get_idx_split()
    parts = [set(split[k].tolist()) for k in ("train", "valid", "test")]
    assert sum(map(len, parts)) == len(SMILES) and not (parts[0] & parts[1] or parts[0] & parts[2])
    # A converted folder loads by path too (the meta-data travels in headprep_meta.json).
    again = load_ogb_dataset(str(folder))
    assert torch.equal(again[3].x, dataset[3].x)


def test_graph_sets_describe_their_molecules_and_label_views_as_their_items(tmp_path):
    # Two converted datasets of one length and labels but other molecules were one sweep's data (the fingerprint
    # hashed lengths and labels): a rerun on the second reused the first's jobs. And a split of a dataset that is a
    # view (`ds[idx]`) read its labels from the storage's rows, not the view's: other graphs' labels.
    from headprep_hf.data.graphs import GraphPropertyDataset, ogb_splits
    from headprep_hf.sweep import describe_data

    labels = graph_labels(len(SMILES), 3, seed=4)
    n = len(SMILES)
    split = {"train": range(0, n - 8), "valid": range(n - 8, n - 4), "test": range(n - 4, n)}

    def splits(smiles, root):
        return ogb_splits(load_ogb_dataset(str(write_ogb_dataset(smiles, labels, root, "mols", split=split))))

    a, b = splits(SMILES, tmp_path / "a"), splits(SMILES[::-1], tmp_path / "b")
    da, db = describe_data(**a), describe_data(**b)
    assert all(da[k]["labels"] == db[k]["labels"] and da[k]["content"] != db[k]["content"] for k in da)
    assert describe_data(**splits(SMILES, tmp_path / "c")) == da  # (the same molecules elsewhere: the same data)
    first = load_ogb_dataset(str(tmp_path / "a" / "mols"))

    view = first[torch.tensor([5, 2, 7, 0])]
    split = GraphPropertyDataset(view, [1, 3])
    items = np.stack([split[i].y.numpy()[0] for i in range(len(split))])
    np.testing.assert_array_equal(split.labels, items)


def test_converter_reports_bad_smiles_and_wrong_task_counts(tmp_path, caplog):
    smiles = SMILES[:6]
    smiles[2] = "C1CC(C"  # unparsable, line 3
    labels = graph_labels(6, 2, seed=5)
    split = {"train": [0, 1, 2, 3], "valid": [4], "test": [5]}  # (5 molecules: a scaffold split leaves one empty)
    with caplog.at_level("WARNING"):
        folder = write_ogb_dataset(smiles, labels, tmp_path, "skips", split=split)
    assert "line 3: cannot parse SMILES 'C1CC(C'" in caplog.text
    assert "indices of skipped SMILES dropped from it: train [2]" in caplog.text
    dataset = load_ogb_dataset(str(folder))
    assert len(dataset) == 5
    kept = [0, 1, 3, 4, 5]  # labels stay with their molecule after the skip
    for new, old in enumerate(kept):
        np.testing.assert_array_equal(dataset[new].y.numpy()[0], labels[old].astype(np.float32))
    assert (folder / "skipped_smiles.csv").read_text().splitlines()[1] == "3,C1CC(C"
    assert load_ogb_dataset(str(folder)).get_idx_split()["train"].tolist() == [0, 1, 2]
    # Named as OGB's own sets are (`--dataset_name NAME --dataset_root ROOT`): OGB answered "Invalid dataset name".
    by_name = load_ogb_dataset("skips", root=tmp_path)
    assert len(by_name) == 5 and by_name.get_idx_split()["train"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="line 3: cannot parse SMILES"):
        write_ogb_dataset(smiles, labels, tmp_path, "strict", on_invalid="raise")
    assert not (tmp_path / "strict" / "raw").exists()
    with pytest.raises(FileExistsError):
        write_ogb_dataset(SMILES[:6], labels, tmp_path, "skips", split=split)
    with pytest.raises(ValueError, match=r"split: valid holds only skipped \(unparsable\) SMILES"):
        write_ogb_dataset(
            smiles, labels, tmp_path, "skips-only", split={"train": [0, 1, 3], "valid": [2], "test": [4, 5]}
        )

    (tmp_path / "mols.smi").write_text("\n".join(SMILES[:3]) + "\n")
    (tmp_path / "labels.csv").write_text("1,0,\n0,1\n1,,0\n")
    with pytest.raises(ValueError, match=r"labels.csv line 2: 2 values, expected 3"):
        read_smiles_and_labels(str(tmp_path / "mols.smi"), str(tmp_path / "labels.csv"), num_tasks=3)
    with pytest.raises(ValueError, match="labels must have shape"):
        write_ogb_dataset(SMILES[:3], np.zeros((2, 3)), tmp_path, "short")


def test_bad_graph_labels_name_the_sample(tmp_path):
    _, splits = tiny_graph_data(tmp_path / "data")
    with pytest.raises(ValueError, match=r"train_dataset has 3 label\(s\) per sample but the model's head has 5"):
        _trainer(tmp_path, tiny_gcn(num_tasks=5), splits).probe_head()
    splits["train"].labels[4, 1] = 2.0
    with pytest.raises(ValueError, match=r"train_dataset\[4\] has label 2.0 for task 1: binary tasks take 0, 1"):
        _trainer(tmp_path, tiny_gcn(), splits).probe_head()


def test_ogb_is_imported_without_its_pypi_check(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from headprep_hf.ogb_compat import import_ogb\n"
        "import_ogb()\n"
        "import ogb.version\n"
        "assert ogb.version.check_outdated is None, 'ogb would query PyPI'\n"
        "assert 'outdated' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_official_name_without_release_file_is_a_clear_error(tmp_path):
    (tmp_path / "ogbg_molhiv" / "raw").mkdir(parents=True)
    (tmp_path / "ogbg_molhiv" / "raw" / "edge.csv.gz").write_bytes(b"")  # (files: an empty folder is removed)
    with pytest.raises(FileNotFoundError, match="no RELEASE_v1.txt, so OGB would prompt on stdin"):
        load_ogb_dataset("ogbg-molhiv", root=tmp_path)


def test_pretrained_gcn_round_trip_with_a_new_head(tmp_path):
    from headprep_hf.tasks.graph import load_graph_model, save_graph_model

    model = tiny_gcn(num_tasks=24)
    save_graph_model(model, tmp_path / "src", info={"note": "test"})
    assert json.loads((tmp_path / "src" / "config.json").read_text())["num_tasks"] == 24
    loaded = load_graph_model(tmp_path / "src", num_tasks=6)
    assert loaded.classifier.out_features == 6
    src = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, src[key]), key


def test_the_graph_task_takes_its_dropout_flag_over_the_saved_models(tmp_path):
    # --dropout was silently ignored: the loaded config's dropout (or the cached offline source's) was used.
    from headprep_hf.models.graph import GCN
    from headprep_hf.tasks.graph import GraphArguments, load_graph, save_graph_model

    folder = write_ogb_dataset(SMILES, graph_labels(len(SMILES), 2, seed=1), tmp_path, "mols")
    save_graph_model(GCN(2, num_layers=2, hidden_size=16, dropout=0.3), tmp_path / "src")
    args = GraphArguments(dataset_name=str(folder), model_name_or_path=str(tmp_path / "src"), dropout=0.1)
    assert load_graph(args, seed=0).model.dropout == 0.1
    args.dropout = None  # (the default: the loaded model's own)
    assert load_graph(args, seed=0).model.dropout == 0.3


def test_a_cached_offline_source_built_otherwise_is_not_reused(tmp_path, caplog):
    # Cache entries were named without their dropout: one of another dropout was reused for a run asking 0.5.
    from headprep_hf.data.graphs import CHEMBL_SPLIT, SCAFFOLD_SPLIT_RULE
    from headprep_hf.models.graph import GCN
    from headprep_hf.tasks.graph import _cached_config_fits, save_graph_model

    save_graph_model(GCN(24, 2, 16, dropout=0.2), tmp_path / "entry", info={"split": CHEMBL_SPLIT})
    assert _cached_config_fits(tmp_path / "entry", 2, 16, 0.2)
    assert not _cached_config_fits(tmp_path / "entry", 2, 16, 0.5)
    assert "built with other settings {'dropout': (0.2, 0.5)}" in caplog.text
    # An entry pretrained on the training part of the earlier scaffold split (no split recorded) is trained again.
    save_graph_model(GCN(24, 2, 16, dropout=0.2), tmp_path / "earlier", info={"epochs": 3})
    assert not _cached_config_fits(tmp_path / "earlier", 2, 16, 0.2)
    assert f"{{'split': (None, {CHEMBL_SPLIT!r})}}" in caplog.text
    # One pretrained on molecules numbered target by target (the split rule alone recorded) is trained again too.
    save_graph_model(GCN(24, 2, 16, dropout=0.2), tmp_path / "by_target", info={"split": SCAFFOLD_SPLIT_RULE})
    assert not _cached_config_fits(tmp_path / "by_target", 2, 16, 0.2)


def test_a_stale_conversion_is_judged_after_it_is_moved_away(tmp_path, caplog):
    # Two processes sharing the cache (two sweep shards): one judged the folder stale, the other meanwhile replaced it
    # with a current conversion, which the first then removed. It is now moved away first, judged, and put back.
    from headprep_hf.data.graphs import CHEMBL_NUMBERING, OGB_META_FILE, SCAFFOLD_SPLIT_RULE, _remove_stale_conversion
    from headprep_hf.files import write_cache_manifest

    folder = tmp_path / "ogb" / "headprep_chembl_downstream"
    folder.mkdir(parents=True)
    current = {"headprep_split": SCAFFOLD_SPLIT_RULE, "headprep_numbering": CHEMBL_NUMBERING}
    (folder / OGB_META_FILE).write_text(json.dumps(current))
    (folder / "theirs").write_text("a current conversion another process published")
    write_cache_manifest(folder)
    _remove_stale_conversion(folder, "judged stale by this process")
    assert (folder / "theirs").is_file() and os.listdir(tmp_path / "ogb") == [folder.name]
    (folder / OGB_META_FILE).write_text(json.dumps({"split": "scaffold"}))  # (the earlier rule's meta)
    write_cache_manifest(folder)
    with caplog.at_level(logging.WARNING):
        _remove_stale_conversion(folder, "judged stale by this process")
    assert os.listdir(tmp_path / "ogb") == [] and "judged stale by this process" in caplog.text
    _remove_stale_conversion(folder, "")  # (another process removed it first: nothing to do)
    assert os.listdir(tmp_path / "ogb") == []


def test_scaffold_split_orders_groups_of_one_size_as_moleculenet():
    # MoleculeNet's rule (OGB's molecule splits): groups by size, then by first index, both descending. Ten molecules:
    # one scaffold of six, four singletons. Train takes the six and, of the singletons, 9 and 8 (8 of 10 = 80%);
    # valid 7 (90%); test 6. Ties by lowest index first (the earlier rule) put 6 and 7 in train, 8 in valid, 9 in test.
    from headprep_hf.data.graphs import scaffold_split

    scaffolds = ["c1ccccc1"] * 6 + ["C1CC1", "C1CCC1", "C1CCCC1", "C1CCCCC1"]
    split = scaffold_split([""] * 10, scaffolds=scaffolds)
    assert split == {"train": [0, 1, 2, 3, 4, 5, 8, 9], "valid": [7], "test": [6]}
    # A larger group goes first whatever its indices; within a size, the highest first index first.
    scaffolds = ["a", "b", "b", "c", "c", "d", "e", "e", "e", "f"]  # groups: e (3), b and c (2: c first), a, d, f
    assert scaffold_split([""] * 10, scaffolds=scaffolds) == {
        "train": [1, 2, 3, 4, 6, 7, 8, 9],  # e, c, b, then f (9) of the singletons
        "valid": [5],
        "test": [0],
    }


def test_graphs_the_gcn_cannot_take_and_a_config_that_does_not_fit_are_named(tmp_path):
    # These failed inside the model: "'NoneType' object has no attribute 'shape'", an embedding dtype error, and a
    # bare load_state_dict RuntimeError.
    from torch_geometric.data import Data

    from headprep_hf.tasks.graph import load_graph_model, save_graph_model

    good = dict(x=torch.zeros(3, 9, dtype=torch.long), edge_index=torch.tensor([[0, 1], [1, 0]]),
                edge_attr=torch.zeros(2, 3, dtype=torch.long), y=torch.tensor([[1.0, 0.0]]))  # fmt: skip
    assert GraphCollator()([Data(**good), Data(**good)])["labels"].shape == (2, 2)
    for change, named in (
        (dict(edge_attr=None), "has no edge_attr"),
        (dict(x=torch.rand(3, 9)), r"x of shape \(3, 9\) and dtype torch.float32"),
        (dict(y=None), "no y"),
    ):
        with pytest.raises(
            ValueError, match=f"GraphCollator: graph 1 of the batch {'has ' if 'has' not in named else ''}{named}"
        ):
            GraphCollator()([Data(**good), Data(**{**good, **change})])
    save_graph_model(tiny_gcn(num_tasks=2), tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the GCN its config.json describes \(size"):
        load_graph_model(tmp_path / "src")


def test_regression_task_uses_mse_and_residual_energy(tmp_path):
    from headprep_hf.data.graphs import ogb_splits

    rng = np.random.default_rng(0)
    values = rng.normal(size=(len(SMILES), 2))
    values[rng.random(values.shape) < 0.2] = np.nan
    values[:, 0] = np.nan_to_num(values[:, 0])
    folder = write_ogb_dataset(SMILES, values, tmp_path, "tiny-regression", task_type="regression")
    dataset = load_ogb_dataset(str(folder))
    assert dataset.task_type == "regression" and dataset.eval_metric == "rmse"
    splits = ogb_splits(dataset)
    from headprep_hf.models.graph import GCN

    torch.manual_seed(0)
    model = GCN(2, num_layers=2, hidden_size=16, dropout=0.0, problem_type="regression")
    trainer = HeadPrepTrainer(
        model=model, args=_config(tmp_path, hp_epochs=1), train_dataset=splits["train"], data_collator=GraphCollator()
    )
    assert trainer.problem_type == "regression"
    # Smoothing a regression target was ignored by the loss and recorded as applied: refused, naming the setting.
    for stage in ("hp", "ft"):
        smoothed = HeadPrepTrainer(
            model=GCN(2, num_layers=2, hidden_size=16, problem_type="regression"),
            args=_config(tmp_path / stage, hp_epochs=1, **{f"{stage}_label_smoothing": 0.3}),
            train_dataset=splits["train"], data_collator=GraphCollator(),
        )  # fmt: skip
        with pytest.raises(ValueError, match=f"{stage}_label_smoothing=0.3 with a regression task"):
            smoothed.train()
    trainer.probe_head()
    model.eval()
    with torch.no_grad():
        batch = GraphCollator()([splits["train"][i] for i in range(len(splits["train"]))])
        y = batch.pop("labels")
        q = model(**batch)["logits"]
    p = ~torch.isnan(y)
    expected = torch.stack([(q[i] - y[i])[p[i]].norm() for i in range(len(y))]).mean()
    assert trainer.dynamics["energy"] == pytest.approx(expected.item(), rel=1e-5)
    assert trainer.dynamics["hp_train_accuracy"] is None and trainer.dynamics["p0_mean"] is None


@pytest.mark.slow
def test_offline_source_sample_converts_only_what_it_names(tmp_path, caplog):
    from headprep_hf.data.graphs import (
        CHEMBL_NUMBERING,
        DOWNSTREAM_TARGETS,
        SCAFFOLD_SPLIT_RULE,
        build_chembl_graph_tasks,
    )
    from headprep_hf.files import write_cache_manifest

    folders = build_chembl_graph_tasks(tmp_path, ["source"], source_molecules=60)
    assert list(folders) == ["source"] and folders["source"].name == "headprep_chembl_source_sub60"
    assert not (tmp_path / "ogb" / "headprep_chembl_downstream").exists()  # not asked for, not converted
    dataset = load_ogb_dataset(str(folders["source"]))
    assert len(dataset) == 60 and dataset.num_tasks == 30 - len(DOWNSTREAM_TARGETS)
    again = build_chembl_graph_tasks(tmp_path, ["source"], source_molecules=60)  # cached: the same folder
    assert again == folders
    # A folder converted with the earlier scaffold split's tie order (no rule recorded) is converted again.
    meta_file = folders["source"] / "headprep_meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta.pop("headprep_split") == SCAFFOLD_SPLIT_RULE
    meta_file.write_text(json.dumps(meta))
    write_cache_manifest(folders["source"])  # (complete, but of the earlier rule)
    with caplog.at_level(logging.WARNING):
        assert build_chembl_graph_tasks(tmp_path, ["source"], source_molecules=60) == folders
    assert "was split by an earlier headprep_hf rule" in caplog.text
    assert json.loads(meta_file.read_text())["headprep_split"] == SCAFFOLD_SPLIT_RULE
    assert sorted(p.name for p in (tmp_path / "ogb").iterdir()) == ["headprep_chembl_source_sub60"]
    # So is one whose molecules were numbered target by target (no numbering recorded).
    meta = json.loads(meta_file.read_text())
    assert meta.pop("headprep_numbering") == CHEMBL_NUMBERING
    meta_file.write_text(json.dumps(meta))
    write_cache_manifest(folders["source"])
    assert build_chembl_graph_tasks(tmp_path, ["source"], source_molecules=60) == folders
    assert json.loads(meta_file.read_text())["headprep_numbering"] == CHEMBL_NUMBERING
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['pretraining'\]"):
        build_chembl_graph_tasks(tmp_path, ["pretraining"])


@pytest.mark.parametrize("damage", ["processed_flipped", "meta_deleted", "release_deleted", "raw_deleted"])
def test_a_damaged_cached_conversion_is_converted_again(tmp_path, caplog, damage):
    # OGB trusts what it finds: one flipped bit in the processed file turned an atom's type (a valid type still) and
    # was trained on; a missing meta file failed on every call with a raw "Directory not empty", a missing
    # RELEASE_v1.txt made OGB prompt on stdin, a missing raw file ended in "unknown url type".
    from headprep_hf.data.graphs import build_chembl_graph_tasks
    from headprep_hf.files import cache_entry_problem

    folder = build_chembl_graph_tasks(tmp_path, ["source"], source_molecules=40)["source"]
    reference = load_ogb_dataset(str(folder))
    expected = (reference._data.x.clone(), reference._data.edge_index.clone(), reference._data.y.clone())
    del reference
    if damage == "processed_flipped":
        path = folder / "processed" / "geometric_data_processed.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path = {
            "meta_deleted": folder / "headprep_meta.json",
            "release_deleted": folder / "RELEASE_v1.txt",
            "raw_deleted": next((folder / "raw").glob("edge*")),
        }[damage]
        path.unlink()
    with caplog.at_level(logging.WARNING):
        assert build_chembl_graph_tasks(tmp_path, ["source"], source_molecules=40)["source"] == folder
    assert "is not used" in caplog.text and str(path) in caplog.text
    assert cache_entry_problem(folder) is None and os.listdir(tmp_path / "ogb") == [folder.name]
    again = load_ogb_dataset(str(folder))._data
    got = (again.x, again.edge_index, again.y)
    assert all(torch.equal(a.nan_to_num(-7), b.nan_to_num(-7)) for a, b in zip(got, expected, strict=True))


def test_the_offline_downstream_split_labels_every_target_in_validation_and_test(tmp_path):
    # The molecules were numbered target by target; nearly every scaffold group is one molecule, ordered by that
    # index, so the split followed the targets: validation held labels of targets {2, 3, 4} only and test of
    # {0, 1, 2, 5}, and tau* was chosen on other targets than those it was tested on.
    from headprep_hf.data.graphs import GraphPropertyDataset, build_chembl_graph_tasks, load_ogb_dataset

    dataset = load_ogb_dataset(str(build_chembl_graph_tasks(tmp_path, ["downstream"])["downstream"]))
    split = dataset.get_idx_split()
    for part in ("valid", "test"):
        present = GraphPropertyDataset(dataset, split[part]).labels
        for target in range(present.shape[1]):
            column = present[:, target]
            column = column[~np.isnan(column)]
            assert (column == 1).any() and (column == 0).any(), (part, target, len(column))


def test_graph_recipe_and_sweep_task(tmp_path, capsys):
    from conftest import run_recipe_and_sweep

    # The real offline path (MoleculeACE -> OGB format -> OGB loader -> source pretraining), with a tiny GCN.
    tiny = ["--cache_dir", str(tmp_path / "cache"), "--hidden_size", "16", "--num_layers", "2", "--source_epochs", "1"]
    tiny += ["--source_max_graphs", "400", "--use_cpu", "true", "--num_train_epochs", "1"]
    metrics, sweep = run_recipe_and_sweep(
        "graph_property", "graph", tiny, tmp_path, probe_samples=64, sweep_extra=("--sweep_exchange", "true")
    )
    assert 0.0 <= metrics["test_roc_auc"] <= 1.0 and metrics["energy"] > 0 and metrics["drift_sq_dist"] > 0
    assert "validation roc_auc" in capsys.readouterr().out
    assert sweep["selection_metric"] == "roc_auc" and sweep["complete"] and sweep["task"]["name"] == "graph"
    energies = [r["energy"] for r in sweep["results"]]
    assert energies[1] < energies[0]  # two HP epochs lower the energy of the random head
    exchange = json.loads((tmp_path / "sweep" / "exchange.json").read_text())  # mean label accuracy per pair
    assert exchange["taus"] == [0, 2] and all(0 <= v <= 1 for row in exchange["validation_accuracy"] for v in row)


def test_pretrain_recipe_then_finetune_recipe_on_a_converted_dataset(tmp_path, capsys):
    import sys
    from pathlib import Path

    from transformers import HfArgumentParser

    from headprep_hf.cli import parse_with_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import graph_property
    import pretrain_graph

    split = {"train": range(16), "valid": range(16, 24), "test": range(24, 32)}
    source = write_ogb_dataset(SMILES, graph_labels(len(SMILES), 5, seed=8), tmp_path, "tiny-source", split=split)
    target = write_ogb_dataset(SMILES, graph_labels(len(SMILES), 2, seed=9), tmp_path, "tiny-target", split=split)
    model_dir = tmp_path / "sup-tiny"
    pre_argv = ["--output_dir", str(model_dir), "--dataset_name", str(source), "--hidden_size", "16"]
    pre_argv += ["--num_layers", "2", "--epochs", "1", "--batch_size", "8", "--use_cpu", "true"]
    metrics = pretrain_graph.main(*parse_with_config(HfArgumentParser(pretrain_graph.PretrainArguments), pre_argv))
    assert "eval_roc_auc" in metrics and (model_dir / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="already holds a model"):
        pretrain_graph.main(*parse_with_config(HfArgumentParser(pretrain_graph.PretrainArguments), pre_argv))
    # --max_graphs: a quick run on the first N training graphs (the recipe had no size flag)
    from headprep_hf.tasks.graph import source_splits

    splits, problem_type = source_splits(str(source), max_graphs=5)
    assert (
        len(splits["train"]) == 5 and len(splits["validation"]) == 8 and problem_type == "multi_label_classification"
    )
    assert list(splits["train"].indices) == list(source_splits(str(source))[0]["train"].indices[:5])
    quick = ["--output_dir", str(tmp_path / "sup-quick"), *pre_argv[2:], "--max_graphs", "5"]
    pretrain_graph.main(*parse_with_config(HfArgumentParser(pretrain_graph.PretrainArguments), quick))
    assert (tmp_path / "sup-quick" / "model.safetensors").is_file()

    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(target), "--hp_epochs", "1"]
    argv += ["--num_train_epochs", "1", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"]
    argv += ["--output_dir", str(tmp_path / "run"), "--save_strategy", "no", "--per_device_train_batch_size", "8"]
    metrics = graph_property.main(*parse_with_config(graph_property.make_parser(), argv))
    assert metrics["energy"] > 0 and "test roc_auc" in capsys.readouterr().out


def test_official_name_that_cannot_be_downloaded_is_a_clear_error(tmp_path, monkeypatch):
    import urllib.error

    from headprep_hf.ogb_compat import import_ogb

    import_ogb()
    import ogb.graphproppred.dataset_pyg as dataset_pyg

    def offline(url):  # what urlopen raises on this machine, without waiting for the network
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(dataset_pyg, "decide_download", offline)
    # (the review's run: PyG had made ogbg_molhiv/raw before the download failed, and every later call, online too,
    # was told to create RELEASE_v1.txt in that empty folder)
    for attempt in range(2):
        with pytest.raises(FileNotFoundError, match=r"ogbg-molhiv is not under .*ogbg_molhiv and OGB could not down"):
            load_ogb_dataset("ogbg-molhiv", root=tmp_path)
        assert not (tmp_path / "ogbg_molhiv").exists(), attempt
    (tmp_path / "ogbg_molhiv" / "raw").mkdir(parents=True)  # (one an earlier version left: removed, not named)
    with pytest.raises(FileNotFoundError, match=r"ogbg-molhiv is not under .*ogbg_molhiv and OGB could not down"):
        load_ogb_dataset("ogbg-molhiv", root=tmp_path)
    # A folder the user made, holding files without RELEASE_v1.txt, is still named (OGB would prompt on stdin).
    (tmp_path / "ogbg_molhiv" / "raw").mkdir(parents=True)
    (tmp_path / "ogbg_molhiv" / "raw" / "edge.csv.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no RELEASE_v1.txt"):
        load_ogb_dataset("ogbg-molhiv", root=tmp_path)


def test_missing_labels_average_over_the_whole_step(tmp_path):
    """Batch 8 == 2 accumulated micro-batches of 4 (uncached and cached): the masked BCE is the mean over every
    present label of the optimizer step, not a mean of micro-batch means (their label counts differ)."""
    _, splits = tiny_graph_data(tmp_path / "data", seed=3)
    heads = {}
    for name, batch, accumulation, cached in (("b8", 8, 1, False), ("b4x2", 4, 2, False), ("b4x2-cached", 4, 2, True)):
        model = tiny_gcn(seed=2)
        trainer = _trainer(
            tmp_path / name, model, splits, hp_epochs=3, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, hp_cache_features=cached, optim="sgd", hp_learning_rate=0.5,
        )  # fmt: skip
        trainer.probe_head()
        heads[name] = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    # (With a mean of micro-batch means instead, the heads differ by up to 70% relative here.)
    for key, value in heads["b8"].items():
        torch.testing.assert_close(heads["b4x2"][key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads["b4x2-cached"][key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The task loader: a new seeded head, the dataset's own metric, multi-process safety
# ---------------------------------------------------------------------------------------------------------------------


def _saved_gcn(folder, num_tasks, problem_type="multi_label_classification", seed=0):
    """A tiny GCN saved as a pretrained source, its head set to values no initialisation gives (a 'trained' head)."""
    from headprep_hf.models.graph import GCN
    from headprep_hf.tasks.graph import save_graph_model

    torch.manual_seed(seed)
    model = GCN(num_tasks, num_layers=2, hidden_size=16, dropout=0.0, problem_type=problem_type)
    with torch.no_grad():
        model.classifier.weight.fill_(0.123)
        model.classifier.bias.fill_(4.0)
    save_graph_model(model, folder)
    return model


def _with_eval_metric(folder, metric: str):
    """Declare another OGB `eval metric` in a converted folder's meta-data (as master.csv does for ogbg-molpcba)."""
    meta_file = folder / "headprep_meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "eval metric": metric}))
    return folder


def test_task_loader_builds_a_new_seeded_head_even_with_the_source_task_count(tmp_path):
    """ogbg-molhiv -> ogbg-molbbbp (1 task each): HP must start from a new head seeded by `seed`, never from the
    source task's trained head, whatever the problem type; the backbone is the saved one."""
    from transformers import set_seed

    from headprep_hf.models.graph import GCN
    from headprep_hf.tasks.graph import GraphArguments, load_graph, load_graph_model

    source = _saved_gcn(tmp_path / "src", num_tasks=1)
    saved = clone_state(source.state_dict())
    binary = write_ogb_dataset(SMILES, graph_labels(len(SMILES), 1, seed=1), tmp_path, "one-task")
    values = np.random.default_rng(0).normal(size=len(SMILES))
    regression = write_ogb_dataset(SMILES, values, tmp_path, "one-target", task_type="regression")
    for folder, problem_type in ((binary, "multi_label_classification"), (regression, "regression")):
        heads = []
        for seed in (0, 1):
            args = GraphArguments(model_name_or_path=str(tmp_path / "src"), dataset_name=str(folder))
            model = load_graph(args, seed).model
            set_seed(seed)
            fresh = GCN(1, num_layers=2, hidden_size=16, dropout=0.0, problem_type=problem_type)
            assert model.problem_type == problem_type
            for key, value in model.state_dict().items():
                expected = fresh.state_dict()[key] if key.startswith("classifier.") else saved[key]
                assert torch.equal(value, expected), (folder.name, seed, key)
            heads.append(model.classifier.weight.detach().clone())
        assert not torch.equal(heads[0], heads[1])  # the seed decides the head
    # Other callers keep the saved head unless they ask for a new one.
    assert torch.equal(load_graph_model(tmp_path / "src", num_tasks=1).classifier.bias, saved["classifier.bias"])
    renewed = load_graph_model(tmp_path / "src", num_tasks=1, new_head=True)
    assert not torch.equal(renewed.classifier.bias, saved["classifier.bias"])


def test_task_selection_metric_follows_the_dataset_eval_metric(tmp_path, capsys, monkeypatch):
    import sys
    from pathlib import Path

    from headprep_hf.cli import parse_with_config
    from headprep_hf.tasks.graph import GraphArguments, load_graph

    _saved_gcn(tmp_path / "src", num_tasks=2)
    rocauc = write_ogb_dataset(SMILES, graph_labels(len(SMILES), 2, seed=1), tmp_path, "rocauc")
    ap = _with_eval_metric(write_ogb_dataset(SMILES, graph_labels(len(SMILES), 2, seed=1), tmp_path, "ap"), "ap")
    values = np.random.default_rng(0).normal(size=(len(SMILES), 2))
    rmse = write_ogb_dataset(SMILES, values, tmp_path, "rmse", task_type="regression")
    for folder, metric in ((rocauc, "roc_auc"), (ap, "ap"), (rmse, "rmse")):
        inputs = load_graph(GraphArguments(model_name_or_path=str(tmp_path / "src"), dataset_name=str(folder)), 0)
        assert inputs.selection_metric == metric
        assert inputs.prefetch_in_memory is False  # the recipe loads graphs in the main process, on a GPU too
        labels = inputs.eval_dataset.labels
        scores = np.random.default_rng(1).normal(size=labels.shape)
        from transformers import EvalPrediction

        assert metric in inputs.compute_metrics(EvalPrediction(predictions=scores, label_ids=labels))

    # The recipe's summary reports the dataset's metric (training replaced: the summary is what is tested here).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import graph_property

    class Finished:
        problem_type = "multi_label_classification"

        def is_world_process_zero(self):
            return True

    metrics = {"validation_ap": 0.61, "test_ap": 0.52, "validation_roc_auc": 0.7, "energy": 0.3}
    monkeypatch.setattr(graph_property, "train_and_evaluate", lambda inputs, args: (Finished(), metrics))
    argv = ["--model_name_or_path", str(tmp_path / "src"), "--dataset_name", str(ap), "--output_dir", str(tmp_path)]
    graph_property.main(*parse_with_config(graph_property.make_parser(), argv + ["--use_cpu", "true"]))
    assert "validation ap 0.6100  test ap 0.5200" in capsys.readouterr().out


def test_average_precision_matches_the_ogb_evaluator():
    from transformers import EvalPrediction

    from headprep_hf.metrics import graph_metrics
    from headprep_hf.ogb_compat import import_ogb

    import_ogb()
    from ogb.graphproppred import Evaluator

    rng = np.random.default_rng(2)
    y = graph_labels(90, 128, seed=6, missing=0.5)  # ogbg-molpcba's 128 tasks (its Evaluator checks the count)
    y[:, 4] = np.where(np.isnan(y[:, 4]), np.nan, 0.0)  # no positive: skipped, as OGB does
    scores = rng.normal(size=y.shape) + 0.7 * np.nan_to_num(y)
    ours = graph_metrics()(EvalPrediction(predictions=scores, label_ids=y))
    expected = Evaluator("ogbg-molpcba").eval({"y_true": y, "y_pred": scores})
    assert Evaluator("ogbg-molpcba").eval_metric == "ap" and ours["ap"] == pytest.approx(expected["ap"], abs=1e-12)
    assert ours["roc_auc"] != pytest.approx(ours["ap"], abs=1e-3)


@pytest.fixture
def fake_sweep(monkeypatch):
    """`headprep sweep` up to the sweep itself: records the sweep_metric the sweep would run with."""
    import headprep_hf.sweep

    seen = []

    class Recorder:
        def __init__(self, model, args, *positional, **keywords):
            seen.append(args.sweep_metric)

        def run(self):
            return {}

    monkeypatch.setattr(headprep_hf.sweep, "TauSweep", Recorder)
    monkeypatch.setattr(headprep_hf.sweep, "format_table", lambda result: "")
    return seen


def test_graph_sweep_selects_by_the_dataset_metric_unless_told(tmp_path, fake_sweep, caplog):
    from headprep_hf.cli import sweep_main

    _saved_gcn(tmp_path / "src", num_tasks=2, problem_type="regression")
    values = np.random.default_rng(0).normal(size=(len(SMILES), 2))
    regression = write_ogb_dataset(SMILES, values, tmp_path, "tiny-regression", task_type="regression")
    ap = _with_eval_metric(write_ogb_dataset(SMILES, graph_labels(len(SMILES), 2), tmp_path, "tiny-ap"), "ap")
    (tmp_path / "loss.yaml").write_text("sweep_metric: loss\n")
    base = ["--task", "graph", "--model_name_or_path", str(tmp_path / "src"), "--use_cpu", "true"]
    base += ["--output_dir", str(tmp_path / "sweep"), "--disable_tqdm", "true"]
    cases = [
        (regression, [], "rmse"),
        (ap, [], "ap"),
        (regression, ["--sweep_metric", "loss"], "loss"),
        (regression, ["--sweep-metric", "loss"], "loss"),
        (regression, ["--sweep_metric=eval_loss"], "loss"),
        (regression, ["--config", str(tmp_path / "loss.yaml")], "loss"),
        (ap, ["--sweep_metric", "roc_auc"], "roc_auc"),  # an explicit value equal to the task default is kept too
    ]
    with caplog.at_level("INFO", logger="headprep_hf.cli"):
        for folder, extra, _ in cases:
            sweep_main([*base, "--dataset_name", str(folder), *extra])
    assert fake_sweep == [metric for _, _, metric in cases]
    assert "sweep_metric 'rmse': the metric of the data" in caplog.text


def test_graph_sweep_on_a_regression_dataset_runs_to_the_end(tmp_path):
    from headprep_hf.cli import sweep_main

    _saved_gcn(tmp_path / "src", num_tasks=2, problem_type="regression")
    values = np.random.default_rng(0).normal(size=(len(SMILES), 2))
    folder = write_ogb_dataset(SMILES, values, tmp_path, "tiny-regression", task_type="regression")
    argv = ["--task", "graph", "--dataset_name", str(folder), "--model_name_or_path", str(tmp_path / "src")]
    argv += ["--use_cpu", "true", "--num_train_epochs", "1", "--sweep_taus", "0", "1", "--disable_tqdm", "true"]
    argv += ["--output_dir", str(tmp_path / "sweep"), "--drift_probe_samples", "8", "--sweep_report", "false"]
    argv += ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32"]
    result = sweep_main(argv)
    assert result["selection_metric"] == "rmse" and result["complete"] and result["tau_star"] in (0, 1)


@pytest.mark.parametrize(
    "split, message",
    [
        (
            {"train": range(0, 24), "valid": range(20, 28), "test": range(28, 32)},
            r"train and valid share 4 .*\[20, 21",
        ),
        ({"train": range(24), "valid": range(24, 28), "test": range(28, 40)}, r"'test'\]: 8 .*out of range.*\[32, 33"),
        ({"train": range(24), "test": range(24, 32)}, r"keys must be exactly .*missing \['valid'\]"),
        ({"train": range(24), "valid": [], "test": range(24, 32)}, r"split\['valid'\] is empty"),
        ({"train": [0, 1.5], "valid": [2], "test": [3]}, r"'train'\]: .*not integers: \[1\.5\]"),
        ({"train": [0, 0, 1], "valid": [2], "test": [3]}, r"'train'\]: indices listed more than once: \[0\]"),
    ],
)
def test_explicit_split_is_checked_before_anything_is_written(tmp_path, split, message):
    with pytest.raises(ValueError, match=message):
        write_ogb_dataset(SMILES, graph_labels(len(SMILES), 2), tmp_path, "bad-split", split=split)
    assert not (tmp_path / "bad_split").exists()
    good = {"train": range(24), "valid": range(24, 28), "test": range(28, 32)}
    write_ogb_dataset(SMILES, graph_labels(len(SMILES), 2), tmp_path, "bad-split", split=good)  # the rerun works


def test_empty_scaffold_split_is_refused_before_writing(tmp_path):
    acyclic = ["C" * k for k in range(2, 14)] + ["CCO", "CCN", "CC(C)O", "CCCl", "CC(=O)C", "CCOC", "CC(C)C"]
    acyclic += ["CCCO", "CCCN", "OCCO", "NCCN", "CC(=O)O", "CCC(=O)O"]
    smiles = acyclic + ["c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CCNCC1", "c1ccc2ccccc2c1"]
    with pytest.raises(ValueError, match=r"test is empty \(train 5, valid 25, test 0 of 30\).*25 molecules.*split="):
        write_ogb_dataset(smiles, graph_labels(len(smiles), 2), tmp_path, "acyclic")
    assert not (tmp_path / "acyclic").exists()
    # five molecules of five scaffolds: no group dominates, the set is too small for 80/10/10 (said so)
    with pytest.raises(ValueError, match=r"valid is empty .*5 molecules are too few for whole scaffold groups"):
        write_ogb_dataset(smiles[-5:], graph_labels(5, 2), tmp_path, "few")


def test_smiles_file_may_be_comma_tab_or_space_separated(tmp_path):
    (tmp_path / "labels.csv").write_text("1,0\n0,1\n1,\n")
    for name, separator in (("mols.csv", ","), ("mols.tsv", "\t"), ("mols.smi", " ")):
        (tmp_path / name).write_text("".join(f"{s}{separator}mol{i}\n" for i, s in enumerate(SMILES[:3])))
        smiles, labels = read_smiles_and_labels(str(tmp_path / name), str(tmp_path / "labels.csv"), 2)
        assert smiles == SMILES[:3] and labels.shape == (3, 2), name
    (tmp_path / "ids.csv").write_text("mol0;x\nmol1;y\n")
    with pytest.raises(ValueError, match=r"no parsable SMILES among 2 .*line 1: 'mol0;x'.*first field"):
        write_ogb_dataset(["mol0;x", "mol1;y"], np.zeros((2, 1)), tmp_path, "ids")


def test_offline_source_pretrains_with_the_runs_use_cpu_after_converting(tmp_path, monkeypatch):
    """On an empty cache the source data is converted (and read by OGB's loader) before the source pretraining, which
    gets the run's use_cpu (CPU ranks train together). The order of the processes of a multi-process launch:
    `test_offline_graph_data_and_source_model_on_two_machines_with_their_own_caches`."""
    import headprep_hf.data.graphs as graphs
    import headprep_hf.tasks.graph as graph_task

    make_config(tmp_path, use_cpu=True)  # the process state the recipe's training arguments set up
    events = []
    dataset, _ = tiny_graph_data(tmp_path / "data", num_tasks=2)

    def build_chembl_graph_tasks(cache_dir, parts, source_molecules=None):
        events.append(f"convert:{parts[0]}")
        return {parts[0]: tmp_path / "data" / "tiny_graphs"}

    def load_ogb_dataset(name_or_path, root=None):
        events.append("load")
        return dataset

    def pretrain_graph_model(splits, output_dir, *positional, use_cpu=False, **keywords):
        events.append(f"pretrain:use_cpu={use_cpu}")
        _saved_gcn(output_dir, num_tasks=2)

    monkeypatch.setattr(graphs, "build_chembl_graph_tasks", build_chembl_graph_tasks)
    monkeypatch.setattr(graphs, "load_ogb_dataset", load_ogb_dataset)
    monkeypatch.setattr(graph_task, "pretrain_graph_model", pretrain_graph_model)
    args = graph_task.GraphArguments(cache_dir=str(tmp_path / "cache"), num_layers=2, hidden_size=16)
    inputs = graph_task.load_graph(args, seed=0)
    assert events == ["convert:downstream", "load", "convert:source", "load", "pretrain:use_cpu=True"]
    assert inputs.model.classifier.out_features == 2
    assert len(list((tmp_path / "cache").glob("chembl24-gcn-*"))) == 1 and not list((tmp_path / "cache").glob(".p*"))


@pytest.mark.parametrize("damage", ["weights_deleted", "weights_flipped", "manifest_deleted"])
def test_a_damaged_cached_source_gcn_is_trained_again(tmp_path, monkeypatch, caplog, damage):
    # A flipped weight was trained on without a word; an entry without its weights was pretrained again on every
    # call, the new model thrown away (the old folder kept as "another process's copy"), and then failed to load.
    import headprep_hf.data.graphs as graphs
    import headprep_hf.tasks.graph as graph_task
    from headprep_hf.files import cache_entry_problem

    dataset, _ = tiny_graph_data(tmp_path / "data", num_tasks=2)
    trained = []

    def pretrain_graph_model(splits, output_dir, *positional, **keywords):
        trained.append(output_dir)
        _saved_gcn(output_dir, num_tasks=2)

    monkeypatch.setattr(graphs, "build_chembl_graph_tasks", lambda c, p, s=None: {p[0]: tmp_path / "data"})
    monkeypatch.setattr(graphs, "load_ogb_dataset", lambda name_or_path, root=None: dataset)
    monkeypatch.setattr(graph_task, "pretrain_graph_model", pretrain_graph_model)
    settings = dict(cache_dir=str(tmp_path / "cache"), epochs=1, num_layers=2, hidden_size=16, dropout=0.0)
    final = graph_task.pretrain_chembl_source(**settings)
    assert len(trained) == 1 and graph_task.pretrain_chembl_source(**settings) == final and len(trained) == 1
    weights = final / "model.safetensors"
    if damage == "weights_deleted":
        weights.unlink()
    elif damage == "weights_flipped":
        data = bytearray(weights.read_bytes())
        data[len(data) - 7] ^= 0x01  # (the last tensor's bytes)
        weights.write_bytes(bytes(data))
    else:
        (final / "headprep_cache_manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert graph_task.pretrain_chembl_source(**settings) == final
    assert len(trained) == 2 and "is not reused" in caplog.text
    assert cache_entry_problem(final) is None and weights.is_file()
    assert graph_task.pretrain_chembl_source(**settings) == final and len(trained) == 2  # (then reused)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [final.name]


_TWO_MACHINE_WORKER = """
import os, sys
from accelerate import PartialState
state = PartialState(cpu=True)
from headprep_hf.tasks.graph import load_graph_dataset, pretrain_chembl_source
cache = os.environ["NODE_CACHE"]
dataset, _ = load_graph_dataset(None, cache_dir=cache)
final = pretrain_chembl_source(cache_dir=cache, epochs=1, num_layers=2, hidden_size=16, max_graphs=64, use_cpu=True)
print(f"rank {state.process_index}: {len(dataset)} graphs, model {(final / 'model.safetensors').is_file()}")
"""


@pytest.mark.slow
def test_offline_graph_data_and_source_model_on_two_machines_with_their_own_caches(tmp_path):
    # Two machines of two processes each (torchrun --nnodes 2 on this host), each machine with its own cache folder
    # (a node-local disk). Before, the main process converted first and then BOTH processes of the second machine
    # converted into its empty cache at once (FileExistsError in the conversion folder); and only the main process
    # published the pretrained source model, so the second machine's processes got the path of a model that was not
    # there. Now the first process of each machine converts and publishes.
    import socket
    import subprocess
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text(_TWO_MACHINE_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in (0, 1):
        env = {**os.environ, "NODE_CACHE": str(tmp_path / f"cache{node}"), "OMP_NUM_THREADS": "1"}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(worker)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    # Records are read by pattern, not by line: the two processes of one machine share torchrun's pipe, and their
    # prints can interleave ("... model Truerank 2: ..."), which failed a CI run with every rank right.
    records = sorted(re.findall(r"rank (\d+): (\d+) graphs, model (True|False)", "".join(outputs)))
    assert [rank for rank, _, _ in records] == ["0", "1", "2", "3"], outputs
    assert all(found == "True" for _, _, found in records), records
    assert len({graphs for _, graphs, _ in records}) == 1  # every rank read the same graphs
    for node in (0, 1):
        cache = tmp_path / f"cache{node}"
        assert (cache / "chembl24-gcn-L2-H16-e1-s0-sub64" / "model.safetensors").is_file()
        assert not [p.name for p in cache.iterdir() if p.name.startswith(".partial")]


def test_the_exchange_accuracy_of_binary_tasks_pools_the_present_labels_as_graph_metrics_does():
    # The exchange took `task_energy`'s per-graph counts: each graph's mean label accuracy, one count per graph. A
    # graph with 6 present labels all right and one with 1 wrong gave 0.5 where the validation accuracy says 6/7.
    from transformers import EvalPrediction

    from headprep_hf.exchange import _correct_and_count
    from headprep_hf.metrics import graph_metrics

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 6)).astype(np.float32)
    labels = (rng.random((40, 6)) < 0.4).astype(np.float32)
    labels[rng.random((40, 6)) < 0.5] = np.nan
    labels[3] = np.nan  # (a graph without any label)
    correct = count = 0.0
    for chunk in (slice(0, 7), slice(7, 30), slice(30, 40)):  # (summed over batches of other sizes)
        c, n = _correct_and_count(torch.from_numpy(logits[chunk]), torch.from_numpy(labels[chunk]), -100,
                                  "multi_label_classification")  # fmt: skip
        correct, count = correct + c, count + n
    expected = graph_metrics("multi_label_classification")(EvalPrediction(logits, labels))["accuracy"]
    assert correct / count == pytest.approx(expected, abs=1e-7)
    assert count == np.sum(~np.isnan(labels))
    nan = float("nan")
    six_and_one = torch.tensor([[1.0] * 6, [0.0] + [nan] * 5])  # (6 labels predicted right; 1 wrong)
    assert _correct_and_count(torch.ones(2, 6), six_and_one, -100, "multi_label_classification") == (6.0, 7.0)


def test_a_missing_graph_extra_is_named_with_its_install(monkeypatch):
    # Without the extra, the graph task failed deep in the data loading (`No module named 'ogb'`), or without RDKit
    # with a misleading `cannot import name 'smiles2graph' from 'ogb.utils'`.
    import importlib.util

    from headprep_hf.tasks import graph

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rdkit" else real(name, *a))
    with pytest.raises(
        ImportError, match=r"needs rdkit, which the graph extra installs: pip install 'headprep_hf\[graph\]'"
    ):
        graph.load_graph(graph.GraphArguments(), seed=0)
    with pytest.raises(ImportError, match="graph extra"):
        graph.load_graph_model("anywhere")
