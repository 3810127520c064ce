"""No host synchronisation per training step added by the toolkit (issue 15, item 3).

On a GPU, reading a tensor's value on the host (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`, ...) waits
for the device. These are the calls counted here, on the CPU, attributed to the frame that made them: between the
first and the last update of an epoch, no call from headprep_hf may read a tensor. Measurements, the guard's flag and
the head-gradient window are read at logging steps, evaluation and epoch ends only. (On an H100 the benchmark
`bench/throughput.py --device cuda` counts the real synchronisations with `torch.cuda.set_sync_debug_mode`.)"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from conftest import TinyImages, make_config, tiny_timm
from transformers import TrainerCallback

from headprep_hf import HeadPrepTrainer

READS = ("item", "__bool__", "__int__", "__float__", "tolist", "numpy", "cpu")


class _Window(TrainerCallback):
    """Counting is on for the updates inside an epoch: not the first update of an epoch (where a stage begins and
    its start-of-stage measurements run) nor the last (epoch end: drift, guard check). Added before the trainer's own
    callbacks, it switches before they run, so their work at these updates is counted too."""

    def __init__(self, state, steps_per_epoch):
        self.state, self.steps = state, steps_per_epoch

    def on_step_begin(self, args, state, control, **kwargs):
        position = state.global_step % self.steps  # 0: the first update of an epoch, steps - 1: the last
        self.state["on"] = 0 < position < self.steps - 1

    def on_epoch_end(self, args, state, control, **kwargs):
        self.state["on"] = False


def _count_reads(monkeypatch, state, counts):
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            if state["on"]:
                caller = traceback.extract_stack(limit=2)[0]  # the frame that read the tensor
                if "headprep_hf" in caller.filename:
                    counts[f"{_name} at {caller.filename.split('headprep_hf/')[-1]}:{caller.lineno}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)


@pytest.mark.parametrize("stage", ["hp+ft", "ft"])
def test_no_host_read_per_step_from_the_toolkit(tmp_path, monkeypatch, stage):
    train = TinyImages(96, seed=0)
    steps = 96 // 16
    args = make_config(
        tmp_path, hp_epochs=1 if stage == "hp+ft" else 0, logging_steps=1000, on_nonfinite="raise", max_grad_norm=1.0
    )
    state, counts = {"on": False}, collections.Counter()
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train, callbacks=[_Window(state, steps)])
    _count_reads(monkeypatch, state, counts)
    trainer.train() if stage == "hp+ft" else trainer.finetune()
    assert trainer.dynamics["energy"] is not None and trainer.dynamics["drift"]  # every measurement ran
    assert not counts, f"host reads of tensors by headprep_hf inside training steps: {dict(counts)}"


def test_the_count_sees_a_per_step_read(tmp_path, monkeypatch):
    # The skip policy must decide before each update whether to apply it: one read per update, counted here.
    train = TinyImages(96, seed=0)
    args = make_config(tmp_path, hp_epochs=0, logging_steps=1000, on_nonfinite="skip")
    state, counts = {"on": False}, collections.Counter()
    trainer = HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=train, callbacks=[_Window(state, 6)])
    _count_reads(monkeypatch, state, counts)
    trainer.finetune()
    assert counts and all("guard.py" in key for key in counts)
    assert sum(counts.values()) == 4  # updates 2..5 of the 6: one read each
