"""A training run that SIGKILLs itself at a chosen moment of a checkpoint write (for tests/test_checkpoints.py).

    python tests/kill_worker.py OUTPUT_DIR [STEP PHASE]

Trains the tiny model of the resume tests (2 HP + 2 FT epochs of 3 steps, a checkpoint every 2 steps, at most one
kept). With STEP and PHASE, the process kills itself with SIGKILL while writing checkpoint-STEP: right after the
file(s) of PHASE were written, with the last of them cut to half its size (`*-torn` phases) as a kill in the middle
of writing it would leave it. Without them it runs to the end.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from conftest import TinyImages, make_config, tiny_timm  # noqa: E402
from transformers import TrainerState  # noqa: E402

from headprep_hf import HeadPrepTrainer  # noqa: E402
from headprep_hf import trainer as trainer_module  # noqa: E402
from headprep_hf.measurements import MeasurementCallback  # noqa: E402
from headprep_hf.stages import StagePlan  # noqa: E402

PHASES = (
    "model-torn",  # model.safetensors cut in half
    "optimizer-torn",  # optimizer.pt cut in half
    "trainer-state",  # after trainer_state.json (Trainer's last file)
    "plan",  # after headprep_state.json
    "measurements-torn",  # headprep_measurements.safetensors (z_0) cut in half
    "committed",  # after the manifest, before the rotation of older checkpoints
)


def trainer_for(output_dir: str) -> HeadPrepTrainer:
    args = make_config(
        Path(output_dir).parent,
        hp_epochs=2,
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=1,
        per_device_train_batch_size=8,
        optim="sgd",
        optim_args="momentum=0.9",
        drift_probe_samples=12,
    )
    args.output_dir = output_dir
    return HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(24, seed=0))


def _die(path: str | None = None) -> None:
    if path is not None:  # a kill while the file was being written leaves part of it
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(trainer: HeadPrepTrainer, step: int, phase: str) -> None:
    """Wrap the writers of one checkpoint so that the process dies at `phase` of checkpoint-`step`."""

    def at_step() -> bool:
        return trainer.state.global_step == step

    def after(original, file_name=None, torn=False):
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            if at_step():
                _die(os.path.join(trainer.checkpoint_dir(), file_name) if torn else None)
            return result

        return wrapped

    if phase == "model-torn":
        trainer.save_model = after(trainer.save_model, "model.safetensors", torn=True)
    elif phase == "optimizer-torn":
        trainer._save_optimizer_and_scheduler = after(trainer._save_optimizer_and_scheduler, "optimizer.pt", True)
    elif phase == "trainer-state":
        TrainerState.save_to_json = after(TrainerState.save_to_json)
    elif phase == "plan":
        StagePlan.save = after(StagePlan.save)
    elif phase == "measurements-torn":
        MeasurementCallback.save = after(MeasurementCallback.save, "headprep_measurements.safetensors", torn=True)
    elif phase == "committed":
        trainer_module.commit = after(trainer_module.commit)
    else:
        raise SystemExit(f"unknown phase {phase}; one of {PHASES}")


def main() -> None:
    output_dir = sys.argv[1]
    trainer = trainer_for(output_dir)
    if len(sys.argv) > 2:
        arm(trainer, int(sys.argv[2]), sys.argv[3])
    trainer.train()


if __name__ == "__main__":
    main()
