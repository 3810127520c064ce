"""Supervised multi-task pretraining of the source GCN (the paper's "Sup-pcba"), saved for --model_name_or_path.

    python recipes/pretrain_graph.py --output_dir models/sup-chembl          # offline: 24 MoleculeACE targets
    python recipes/pretrain_graph.py --output_dir /tmp/sup-quick --max_graphs 1000 --epochs 1   # a quick try
    accelerate launch recipes/pretrain_graph.py --dataset_name ogbg-molpcba --dataset_root DIR \\
        --output_dir models/sup-pcba --epochs 100                               # the paper's source (128 tasks)

Writes OUTPUT_DIR/config.json and model.safetensors; the validation ROC-AUC (or RMSE) is printed and stored in the
config's "info".
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from accelerate import PartialState
from transformers import HfArgumentParser

from headprep_hf.cli import parse_with_config, run_command
from headprep_hf.tasks.graph import pretrain_graph_model, source_splits


@dataclass
class PretrainArguments:
    output_dir: str = field(metadata={"help": "Where config.json and model.safetensors go (must not hold a model)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "OGB name (ogbg-molpcba) with --dataset_root, or a converted folder."}
    )
    dataset_root: str | None = field(default=None, metadata={"help": "Folder holding the OGB dataset folders."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of the converted offline data."})
    num_layers: int = field(default=5, metadata={"help": "GCN layers."})
    hidden_size: int = field(default=300, metadata={"help": "GCN width."})
    dropout: float = field(default=0.5, metadata={"help": "Dropout after each layer."})
    epochs: int = field(default=3, metadata={"help": "Training epochs."})
    max_graphs: int | None = field(
        default=None,
        metadata={
            "help": "Train on the first N training graphs only (quick runs); offline, only a seeded sample of the "
            "source molecules is converted."
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate (cosine schedule)."})
    batch_size: int = field(default=128, metadata={"help": "Per-device batch size."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is there."})


def main(args: PretrainArguments) -> dict:
    from pathlib import Path

    if (Path(args.output_dir) / "model.safetensors").exists():
        raise FileExistsError(f"{args.output_dir} already holds a model; choose another --output_dir")
    PartialState(cpu=args.use_cpu)  # the launch's processes: the main one converts the data first
    splits, problem_type = source_splits(args.dataset_name, args.dataset_root, args.cache_dir, args.max_graphs)
    metrics = pretrain_graph_model(
        splits, args.output_dir, problem_type, args.num_layers, args.hidden_size, args.dropout,
        args.epochs, args.learning_rate, args.batch_size, args.seed, args.use_cpu,
    )  # fmt: skip
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    run_command(main, *parse_with_config(HfArgumentParser(PretrainArguments), sys.argv[1:]))
