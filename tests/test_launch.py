"""Launch safety: several processes are one job of several ranks, or the run says why not (README "Launching")."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import TinyImages, make_config, tiny_timm
from PIL import Image

from headprep_hf import HeadPrepTrainer
from headprep_hf.launch import ALLOW_INDEPENDENT_ENV, LaunchError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "image_classification.py"
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("ACCELERATE_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def no_launcher(monkeypatch):
    for key in LAUNCHER_VARS + MPI_VARS + (ALLOW_INDEPENDENT_ENV, "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "launcher_env",
    [{"WORLD_SIZE": "2", "RANK": "0"}, {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}],  # mpirun's
    ids=["WORLD_SIZE", "mpirun"],
)
def test_launcher_ranks_without_a_process_group_are_refused(tmp_path, no_launcher, launcher_env):
    """The launcher's variables say 2 ranks, but use_cpu is unset and there is no LOCAL_RANK: accelerate opens no
    process group and this process would train alone (the real torchrun case: the slow test below)."""
    for key, value in launcher_env.items():
        no_launcher.setenv(key, value)
    args = make_config(tmp_path, use_cpu=False)
    assert args.world_size == 1  # what makes independent copies
    with pytest.raises(LaunchError, match=r"started 2 processes .*add `--use_cpu true`"):
        HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(16))
    assert not (tmp_path / "out").exists()
    # The opt-out: independent copies on purpose.
    no_launcher.setenv(ALLOW_INDEPENDENT_ENV, "1")
    trainer = HeadPrepTrainer(
        model=tiny_timm(), args=make_config(tmp_path, use_cpu=False), train_dataset=TinyImages(16)
    )
    assert trainer.args.world_size == 1


def test_one_process_without_launcher_is_accepted(tmp_path, no_launcher, caplog):
    with caplog.at_level(logging.WARNING, logger="headprep_hf.launch"):
        HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path), train_dataset=TinyImages(16))
    assert not caplog.records


@pytest.mark.slow
def test_accelerate_launch_without_multi_gpu_runs_one_process_and_warns(tmp_path, no_launcher, caplog):
    """`accelerate launch --cpu --num_processes 2` starts the script once; given its environment, the trainer warns."""
    script = tmp_path / "dump_env.py"
    script.write_text(
        "import json, os, sys\nwith open(sys.argv[1], 'a') as f:\n    f.write(json.dumps(dict(os.environ)) + '\\n')\n"
    )
    dumps = tmp_path / "env.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        str(script),
        str(dumps),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dumps.read_text().splitlines()
    assert len(lines) == 1  # one process, although 2 were asked for
    launched = json.loads(lines[0])
    assert "WORLD_SIZE" not in launched and "MASTER_ADDR" in launched
    for key in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT"):
        no_launcher.setenv(key, launched[key])
    with caplog.at_level(logging.WARNING, logger="headprep_hf.launch"):
        HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path), train_dataset=TinyImages(16))
    (record,) = caplog.records
    assert "started this script as ONE process" in record.getMessage()
    assert "--multi_gpu --num_processes N" in record.getMessage()


def _image_folders(root: Path) -> None:
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 16), ("val", 4)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 255, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory) -> list[str]:
    """The image recipe's flags for a tiny job: a local timm folder and 2 x 16 training images, batch 4 per device."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    timm.models.save_for_hf(
        timm.create_model("test_resnet", num_classes=10), str(root / "source"), safe_serialization=True
    )
    _image_folders(root / "images")
    return [
        "--model_name_or_path", str(root / "source"), "--train_dir", str(root / "images" / "train"),
        "--validation_dir", str(root / "images" / "val"), "--image_size", "24", "--no_aug", "true",
        "--hp_epochs", "1", "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--dataloader_num_workers", "0", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--drift_probe_samples", "8", "--log_level", "info", "--log_level_replica", "info",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_cpu_processes_are_one_job_of_two_ranks(tmp_path, recipe_inputs):
    """The README's CPU multi-process command: `accelerate launch --multi_gpu --num_processes 2 ... --use_cpu true`."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd = [*launch, "--main_process_port", str(_free_port()), str(RECIPE), *recipe_inputs, "--use_cpu", "true"]
    # No --output_dir: the recipe's time-stamped default, which both ranks must share.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    # Each rank logs its global batch: 4 per device x world size 2. Two independent copies would log 4, twice.
    batches = re.findall(r"Total train batch size \(w\. parallel, distributed & accumulation\) = (\d+)", output)
    assert batches == ["8", "8"], output[-4000:]
    assert len(re.findall(r"^tau=1  validation accuracy", proc.stdout, flags=re.M)) == 1  # rank 0 reports
    (run,) = (tmp_path / "runs").iterdir()  # one output folder for the job
    assert (run / "model.safetensors").is_file() and (run / "prepared_head").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, torchrun's ranks open an NCCL group and train")
def test_torchrun_on_cpu_without_use_cpu_is_refused_on_every_rank(tmp_path, recipe_inputs):
    """The issue's case: `torchrun --nproc_per_node 2` without `--use_cpu true` made two independent copies."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = [*launch, "--master_port", str(_free_port()), str(RECIPE), *recipe_inputs, "--output_dir", "out"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for rank in (0, 1):  # (one line each: the refusal, not a traceback)
        assert f"image_classification.py [rank {rank}]: error: The launcher started 2 processes" in output
    assert "add `--use_cpu true`" in output and not (tmp_path / "out").exists()
