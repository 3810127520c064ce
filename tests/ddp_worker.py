"""Worker for tests/test_distributed.py: runs HeadPrepTrainer scenarios on 1 or 2 CPU (gloo) ranks.

Launched by the tests as

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/ddp_worker.py --out DIR --scenarios ...
    python tests/ddp_worker.py --out DIR --scenarios ...            # the 1-process equivalent

Every rank writes, for each scenario, `DIR/<scenario>/rank<r>.safetensors` (its `model.state_dict()`) and
`DIR/<scenario>/rank<r>.json` (world size, rank, step, dynamics, ...); rank 0 also writes `init.safetensors`, the
model state the trainer started from. Scenarios:

* `hpft`: `trainer.train()` (HP then FT).
* `hp`: `trainer.probe_head()` with a global batch of `HP_GLOBAL_BATCH` split over the ranks.
* `measure`: load `--states/s0.safetensors`, `measure_start()`, load `--states/s1.safetensors`, `measure_drift()`.
* `bn`: `probe_head()` of a head with BatchNorm (`bn_head_model`); its statistics are recomputed over all ranks.
* `mcprobe`: z_0 of a multiple-choice model's drift probe (`measure_start()`).
* `plainbn`: plain `Trainer` and `HeadPrepTrainer(hp_epochs=0)` on `bn_head_model`, evaluated and predicting.
* `refuse`: an HP run into a folder with an earlier run's results, refused on every rank.
* `sweep`: a tau sweep (cached HP, exchange) with a global batch of `HP_GLOBAL_BATCH` split over the ranks; every rank
  writes the result it returned, rank 0 the sweep folder (`out/`).

The builders (`TinyImages`, `tiny_model`) are imported by the test process for its own reference computations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import timm
import torch
from torch.utils.data import Dataset

# Sizes shared with the test module.
HPFT_SAMPLES = 32
HPFT_BATCH_PER_DEVICE = 8
HP_SAMPLES = 32
HP_GLOBAL_BATCH = 8
MEASURE_SAMPLES = 37  # not divisible by the world size (2) nor by the eval batch size (4)
MEASURE_EVAL_BATCH = 4
MEASURE_PROBE = 29
MC_QUESTIONS = 5  # a multiple-choice probe: 5 questions in batches of 2 per rank
NUM_CLASSES = 3
GRAPH_TASKS = 3
IMAGE_SIZE = 16
BN_MEASURE_BATCH = 4  # batches of the BatchNorm-statistics pass: 8 over 32 samples, 4 per rank on 2 ranks


class TinyImages(Dataset):
    """Random 3x16x16 images whose labels shift one channel's brightness (so a head can learn something)."""

    def __init__(self, n: int, num_classes: int = NUM_CLASSES, seed: int = 0, size: int = IMAGE_SIZE):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g).numpy()
        for c in range(num_classes):
            self.x[self.labels == c, c % 3] += 1.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": int(self.labels[i])}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=NUM_CLASSES)


def bn_head_model(seed: int = 0) -> torch.nn.Module:
    """test_resnet whose classifier `fc` is Linear - BatchNorm1d - ReLU - Linear."""
    model = tiny_model(seed)
    torch.manual_seed(seed + 1)
    model.fc = torch.nn.Sequential(
        torch.nn.Linear(model.num_features, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, NUM_CLASSES),
    )
    return model


def _config(out_dir: str, **overrides):
    from headprep_hf import HeadPrepConfig

    defaults = dict(
        output_dir=out_dir,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(overrides)
    return HeadPrepConfig(**defaults)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write(folder: str, trainer, model: torch.nn.Module, extra: dict) -> None:
    from safetensors.torch import save_file

    rank = trainer.args.process_index
    save_file(_state(model), os.path.join(folder, f"rank{rank}.safetensors"))
    meta = {
        "world_size": trainer.args.world_size,
        "process_index": rank,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "global_step": trainer.state.global_step,
        "dynamics": trainer.dynamics,
        **extra,
    }
    tmp = os.path.join(folder, f"rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(folder, f"rank{rank}.json"))


def _save_init(folder: str, trainer, model) -> None:
    from safetensors.torch import save_file

    if trainer.args.process_index == 0:
        save_file(_state(model), os.path.join(folder, "init.safetensors"))


def _hpft_config(folder: str, **overrides):
    """One HP epoch then one FT epoch of HPFT_SAMPLES images at HPFT_BATCH_PER_DEVICE per rank."""
    return _config(
        os.path.join(folder, "out"),
        hp_epochs=1,
        num_train_epochs=1,
        per_device_train_batch_size=HPFT_BATCH_PER_DEVICE,
        per_device_eval_batch_size=HPFT_BATCH_PER_DEVICE,
        hp_learning_rate=5e-2,
        learning_rate=1e-2,
        drift_probe_samples=12,
        **overrides,
    )


def run_hpft(folder: str):
    from headprep_hf import HeadPrepTrainer

    args = _hpft_config(folder)
    model = tiny_model(seed=0)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(HPFT_SAMPLES, seed=0))
    _save_init(folder, trainer, model)
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    _write(
        folder,
        trainer,
        model,
        {"hp_steps": trainer.stage_plan.hp_steps, "ft_steps": trainer.stage_plan.ft_steps, "wrapper": wrapped},
    )
    return trainer


def _probe(folder: str, model: torch.nn.Module, **overrides):
    """`probe_head()` of `model` on the HP_SAMPLES training images; rank 0 saves the initial state first."""
    from headprep_hf import HeadPrepTrainer

    args = _config(os.path.join(folder, "out"), hp_learning_rate=5e-2, drift_probe_samples=12, **overrides)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(HP_SAMPLES, seed=0))
    _save_init(folder, trainer, model)
    trainer.probe_head()
    return trainer


def run_hp(folder: str, world_size: int):
    if HP_GLOBAL_BATCH % world_size:
        raise ValueError(f"global batch {HP_GLOBAL_BATCH} not divisible by {world_size} ranks")
    model = tiny_model(seed=0)
    trainer = _probe(
        folder,
        model,
        hp_epochs=2,
        per_device_train_batch_size=HP_GLOBAL_BATCH // world_size,
        per_device_eval_batch_size=8,
    )
    _write(folder, trainer, model, {"hp_steps": trainer.stage_plan.hp_steps})
    return trainer


def run_bn(folder: str):
    """HP of a head with BatchNorm: its statistics are recomputed at the end of HP over every rank's batches."""
    model = bn_head_model(seed=0)
    trainer = _probe(folder, model, hp_epochs=1, per_device_train_batch_size=8, measure_batch_size=BN_MEASURE_BATCH)
    _write(folder, trainer, model, {})
    return trainer


def run_bnpad(folder: str):
    """The BatchNorm-statistics pass over MEASURE_SAMPLES (37) samples at BN_MEASURE_BATCH (4): 10 batches, the last
    of one sample (left out). Two ranks take 5 batches each, and Accelerate used to refill the last one with samples
    from the start, which were then counted twice."""
    model = bn_head_model(seed=0)
    args = _config(os.path.join(folder, "out"), hp_epochs=1, per_device_train_batch_size=8, hp_learning_rate=5e-2,
                   measure_batch_size=BN_MEASURE_BATCH, drift_probe_samples=12)  # fmt: skip
    from headprep_hf import HeadPrepTrainer

    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(MEASURE_SAMPLES, seed=0))
    trainer.probe_head()
    _write(folder, trainer, model, {})
    return trainer


def run_cachedeval(folder: str):
    """train() with cached HP and an evaluation each epoch: HP's evaluation ran before FT's training loop and left
    the model marked prepared, so FT ran without DistributedDataParallel (each rank trained its own copy)."""
    from headprep_hf import HeadPrepTrainer

    args = _hpft_config(folder, hp_cache_features=True, eval_strategy="epoch")
    model = tiny_model(seed=0)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(HPFT_SAMPLES, seed=0),
                              eval_dataset=TinyImages(12, seed=1))  # fmt: skip
    trainer.train()
    _write(folder, trainer, model, {"wrapper": type(trainer.model_wrapped).__name__})
    return trainer


class _WithLoss(torch.nn.Module):
    """A timm model as `Trainer` takes it: `forward(pixel_values, labels)` returning the loss and the logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels=None):
        logits = self.model(pixel_values)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits} if loss is not None else {"logits": logits}


def run_plainbn(folder: str):
    """hp_epochs=0 (every measurement on) and a plain `Trainer` on a model whose head has BatchNorm: evaluation every
    2 updates and at the end, then predict. Each rank keeps its own BatchNorm statistics after its last batch, and
    `Trainer` evaluates each rank's share with them; the trainer evaluated with rank 0's (and its drift pass left them
    in place)."""
    from transformers import Trainer, TrainingArguments

    from headprep_hf import HeadPrepTrainer

    results = {}
    for name, trainer_cls in (("trainer", Trainer), ("headprep", HeadPrepTrainer)):
        settings = dict(
            output_dir=os.path.join(folder, name), use_cpu=True, report_to="none", save_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True, seed=0, num_train_epochs=2, per_device_train_batch_size=4,
            per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2, logging_steps=1, learning_rate=1e-2,
        )  # fmt: skip
        if trainer_cls is Trainer:
            args = TrainingArguments(**settings)
        else:
            args = _config(settings.pop("output_dir"), hp_epochs=0, drift_probe_samples=12, **settings)
        model = _WithLoss(bn_head_model(seed=0))
        trainer = trainer_cls(model=model, args=args, train_dataset=TinyImages(20, seed=0),
                              eval_dataset=TinyImages(13, seed=1))  # fmt: skip
        trainer.train()
        final = trainer.evaluate()
        predictions = trainer.predict(TinyImages(13, seed=2))
        results[name] = {
            "evals": [r for r in trainer.state.log_history if "eval_loss" in r],
            "final": final,
            "predictions": predictions.predictions.tolist(),
        }
    _write(folder, trainer, model, results)
    return trainer


def run_refuse(folder: str):
    """HP into an output_dir holding an earlier run's headprep_dynamics.json: every rank refuses (only the rank that
    writes looked, and the other went on into training, waiting in its first collective)."""
    from headprep_hf import HeadPrepTrainer

    out = os.path.join(folder, "out")
    args = _config(out, hp_epochs=1, per_device_train_batch_size=8)
    if args.process_index == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "headprep_dynamics.json"), "w") as f:
            f.write("{}")
    trainer = HeadPrepTrainer(model=tiny_model(seed=0), args=args, train_dataset=TinyImages(16, seed=0))
    trainer.accelerator.wait_for_everyone()  # (the earlier run's file is there before any rank looks)
    try:
        trainer.train()
        refusal = None
    except ValueError as error:
        refusal = str(error)
    # A push into a model repo that holds its own card: refused on every rank (rank 0 alone raised, the others
    # returned and waited at the barrier). The Hub is a fake at the huggingface_hub API boundary: no network.
    from huggingface_hub import HfApi

    HfApi.create_repo = lambda self, repo_id, **kwargs: None
    HfApi.list_repo_files = lambda self, repo_id, **kwargs: [".gitattributes", "README.md", "model.safetensors"]
    try:
        trainer.push_head_to_hub("user/model")
        push_refusal = None
    except FileExistsError as error:
        push_refusal = str(error)
    _write(folder, trainer, trainer.model, {"refusal": refusal, "push_refusal": push_refusal})
    return trainer


def run_search(folder: str):
    """Trainer's Optuna search with HP under DDP: rank 0 runs the study, the other rank follows each trial (Trainer
    broadcasts it); every trial's model is built from model_init on each rank, its HP settings applied."""
    import optuna
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from headprep_hf import HeadPrepTrainer

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    class KeepFinal(TrainerCallback):
        def __init__(self):
            self.states = []

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.states.append(_state(model))

    def space(trial):
        return {"hp_epochs": trial.suggest_categorical("hp_epochs", [1, 2])}

    keep = KeepFinal()
    args = _config(
        os.path.join(folder, "out"), per_device_train_batch_size=4, num_train_epochs=1, eval_strategy="epoch"
    )
    trainer = HeadPrepTrainer(
        model_init=lambda: tiny_model(seed=0), args=args, train_dataset=TinyImages(16, seed=0),
        eval_dataset=TinyImages(8, seed=1), callbacks=[keep],
    )  # fmt: skip
    best = trainer.hyperparameter_search(
        hp_space=space, backend="optuna", n_trials=2, direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=1),
    )  # fmt: skip
    assert len(keep.states) == 2
    extra = {"best": None if best is None else best.hyperparameters}
    for number, state in enumerate(keep.states):
        save_file(state, os.path.join(folder, f"trial{number}-rank{trainer.args.process_index}.safetensors"))
    _write(folder, trainer, tiny_model(seed=0), extra)
    return trainer


class Questions(Dataset):
    """Multiple choice: MC_QUESTIONS questions of 3 choices of 6 token ids."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 50, (n, 3, 6), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": int(self.labels[i])}


def run_mcprobe(folder: str):
    """z_0 of a multiple-choice model's probe (one head input per choice) over MC_QUESTIONS questions, in batches of
    2 per rank: the last gathered batch repeats a question, and Accelerate cut that repeat by rows, not questions."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForMultipleChoice

    from headprep_hf import HeadPrepTrainer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)  # fmt: skip
    model = BertForMultipleChoice(config)
    args = _config(os.path.join(folder, "out"), hp_epochs=1, per_device_train_batch_size=2, measure_batch_size=2,
                   drift_probe_samples=MC_QUESTIONS)  # fmt: skip
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=Questions(MC_QUESTIONS))
    trainer.measure_start()
    if trainer.args.process_index == 0:
        save_file({"z0": trainer.measurements.z0.contiguous()}, os.path.join(folder, "z0.safetensors"))
    _write(folder, trainer, model, {})
    return trainer


def run_measure(folder: str, states: str):
    from safetensors.torch import load_file

    from headprep_hf import HeadPrepTrainer

    args = _config(
        os.path.join(folder, "out"),
        hp_epochs=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=MEASURE_EVAL_BATCH,
        drift_probe_samples=MEASURE_PROBE,
    )
    model = tiny_model(seed=0)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=TinyImages(MEASURE_SAMPLES, seed=3))
    model.load_state_dict(load_file(os.path.join(states, "s0.safetensors")))
    start = trainer.measure_start()
    z0 = trainer.measurements.z0.clone()
    model.load_state_dict(load_file(os.path.join(states, "s1.safetensors")))
    drift = trainer.measure_drift()
    if trainer.args.process_index == 0:
        from safetensors.torch import save_file

        save_file({"z0": z0.contiguous()}, os.path.join(folder, "z0.safetensors"))
    _write(folder, trainer, model, {"start": start, "drift": drift})
    return trainer


def run_sweep(folder: str, world_size: int):
    from headprep_hf import SweepConfig, TauSweep
    from headprep_hf.metrics import accuracy_metrics

    args = SweepConfig(
        output_dir=os.path.join(folder, "out"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        sweep_taus=[0, 1, 2],
        sweep_exchange=True,
        sweep_report=False,
        sweep_progress=False,
        hp_cache_features=True,
        num_train_epochs=1,
        per_device_train_batch_size=HP_GLOBAL_BATCH // world_size,
        per_device_eval_batch_size=4,
        hp_learning_rate=5e-2,
        learning_rate=1e-2,
        drift_probe_samples=12,
    )
    sweep = TauSweep(
        tiny_model(seed=0),
        args,
        TinyImages(HP_SAMPLES, seed=0),
        TinyImages(13, seed=1),
        compute_metrics=accuracy_metrics(),
    )
    result = sweep.run()
    rank = args.process_index
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": args.world_size, "process_index": rank, "result": result}, f, indent=1)
    return sweep


def run_graph(folder: str, graph_dir: str, world_size: int):
    """GCN on molecule graphs (dict batches from GraphCollator): energy of the initial state, then HP + FT."""
    from conftest import tiny_gcn

    from headprep_hf import HeadPrepTrainer
    from headprep_hf.data.graphs import GraphCollator, load_ogb_dataset, ogb_splits

    splits = ogb_splits(load_ogb_dataset(graph_dir))
    args = _config(
        os.path.join(folder, "out"), hp_epochs=1, num_train_epochs=1, per_device_train_batch_size=4,
        per_device_eval_batch_size=3, hp_learning_rate=5e-2, learning_rate=1e-2, drift_probe_samples=11,
    )  # fmt: skip
    # HP with a global batch of 8 over 24 graphs with missing labels: the step's mean covers every rank's labels.
    from safetensors.torch import save_file

    from headprep_hf.data.graphs import GraphPropertyDataset

    train = splits["train"]
    hp_args = _config(
        os.path.join(folder, "hp"), hp_epochs=2, per_device_train_batch_size=8 // world_size, hp_learning_rate=0.5,
        optim="sgd", drift_probe_samples=8,
    )  # fmt: skip
    hp_model = tiny_gcn(num_tasks=GRAPH_TASKS, seed=0)
    hp_trainer = HeadPrepTrainer(model=hp_model, args=hp_args, train_dataset=GraphPropertyDataset(
        train.dataset, train.indices[:24]), data_collator=GraphCollator())  # fmt: skip
    hp_trainer.probe_head()
    head = {k: v.detach().clone().contiguous() for k, v in hp_model.state_dict().items() if k.startswith("classifier")}
    save_file(head, os.path.join(folder, f"hp_head_rank{hp_trainer.args.process_index}.safetensors"))

    model = tiny_gcn(num_tasks=GRAPH_TASKS, seed=0)
    trainer = HeadPrepTrainer(model=model, args=args, train_dataset=train, data_collator=GraphCollator())
    _save_init(folder, trainer, model)
    start = trainer.measure_start()
    p0 = list(trainer.dynamics["p0"])
    trainer.train()
    _write(folder, trainer, model, {"start": start, "start_p0": p0, "num_train": len(splits["train"])})
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True, help="comma-separated: hpft, hp, measure")
    parser.add_argument("--states", default=None, help="folder with s0.safetensors and s1.safetensors")
    parser.add_argument("--graph_data", default=None, help="OGB folder of the graph scenario")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    runs = {
        "hpft": run_hpft,
        "hp": lambda folder: run_hp(folder, world_size),
        "measure": lambda folder: run_measure(folder, opts.states),
        "graph": lambda folder: run_graph(folder, opts.graph_data, world_size),
        "sweep": lambda folder: run_sweep(folder, world_size),  # (returns no trainer: the last one syncs)
        "bn": run_bn,
        "bnpad": run_bnpad,
        "cachedeval": run_cachedeval,
        "mcprobe": run_mcprobe,
        "plainbn": run_plainbn,
        "refuse": run_refuse,
        "search": run_search,
    }
    trainer = None
    for scenario in opts.scenarios.split(","):
        folder = os.path.join(opts.out, scenario)
        os.makedirs(folder, exist_ok=True)
        if scenario not in runs:
            raise ValueError(f"unknown scenario {scenario!r}")
        result = runs[scenario](folder)
        trainer = trainer if scenario == "sweep" else result
        trainer.accelerator.wait_for_everyone()

    # 2-rank gloo jobs sometimes abort at interpreter exit after finishing (DESIGN.md, "Traps seen"): leave hard.
    if trainer is not None:
        trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    np.random.seed(0)
    main()
