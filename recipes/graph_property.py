"""Head probing then finetuning of a GCN on molecule graphs (OGB format), with the paper's measurements.

Offline default (no arguments): the source GCN (5 layers, hidden 300) is pretrained multi-task on 24 ChEMBL targets
shipped in MoleculeACE (cached on the first run), then HP + FT on 6 held-out targets (binary, missing labels, scaffold
split), read through OGB's PygGraphPropPredDataset; prints validation/test ROC-AUC (the dataset's OGB metric: average
precision for ogbg-molpcba/molmuv, RMSE for regression), energy, HP train label accuracy (the mean over training
graphs of each graph's label accuracy) and drift:

    python recipes/graph_property.py
    accelerate launch recipes/graph_property.py --hp_epochs 8 --output_dir runs/graph8
    headprep sweep --task graph                      # the tau sweep (tau* by the dataset's validation metric)

The paper's setting: pretrain on ogbg-molpcba with recipes/pretrain_graph.py, then
    python recipes/graph_property.py --dataset_name ogbg-moltox21 --dataset_root DIR --model_name_or_path SUP_PCBA
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from headprep_hf import HeadPrepConfig
from headprep_hf.cli import parse_with_config, run_command
from headprep_hf.tasks.base import recipe_parser, summary_text, train_and_evaluate
from headprep_hf.tasks.graph import GRAPH_DEFAULTS, GraphArguments, load_graph


def make_parser() -> HfArgumentParser:
    return recipe_parser(GraphArguments, GRAPH_DEFAULTS, "graph_property")


def main(script_args: GraphArguments, training_args: HeadPrepConfig) -> dict:
    inputs = load_graph(script_args, training_args.seed)
    trainer, metrics = train_and_evaluate(inputs, training_args)
    name = inputs.selection_metric  # the dataset's own metric (OGB's eval_metric)
    if trainer.is_world_process_zero():
        entries = [(f"validation {name}", f"validation_{name}"), (f"test {name}", f"test_{name}")]
        entries += [("energy", "energy"), ("HP train label accuracy", "hp_train_accuracy")]
        print(summary_text(training_args, metrics, entries))
    return metrics


if __name__ == "__main__":
    run_command(main, *parse_with_config(make_parser(), sys.argv[1:]))
