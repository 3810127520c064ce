"""Launch checks: a run whose launcher asked for several processes must really be one job of several ranks.

Two ways a multi-process launch silently becomes something else (both seen on a CPU machine, accelerate 1.15,
transformers 5.24):

* `torchrun --nproc_per_node N` (and `accelerate launch --multi_gpu`, which runs torchrun) start N processes and set
  `WORLD_SIZE`/`RANK`/`LOCAL_RANK`, but accelerate's `PartialState` runs distributed only when it finds GPUs or is
  told to use the CPU (`TrainingArguments.use_cpu` / `ACCELERATE_USE_CPU`): without either its `num_processes` is 1
  (`_prepare_backend` picks no distributed type) and each process trains alone, on all the data, into the same
  `output_dir`. Refused here, before anything is written.
* `accelerate launch --num_processes N` without `--multi_gpu` (also with `--cpu` or a MULTI_CPU config file, unless
  mpirun is used) runs ONE process: its simple launcher only sets `MASTER_ADDR`/`MASTER_PORT`. A warning here.
"""

from __future__ import annotations

import logging
import os

from accelerate.utils import get_int_from_env

logger = logging.getLogger(__name__)

# Set to 1 to let processes of one launch train as independent copies (each with its own output_dir).
ALLOW_INDEPENDENT_ENV = "HEADPREP_ALLOW_INDEPENDENT_PROCESSES"
# The world-size variables of torchrun and of the MPI launchers, as accelerate reads them (`PartialState`).
WORLD_SIZE_VARS = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]

_warned: set[str] = set()


class LaunchError(RuntimeError):
    """The launcher started several processes, but each of them would train alone."""


def launched_world_size() -> int:
    """The number of processes the launcher says this job has (1 when no launcher variable is set)."""
    return get_int_from_env(WORLD_SIZE_VARS, 1)


def check_launch(args) -> None:
    """Refuse a multi-process launch whose processes would each train alone; warn when `accelerate launch` was asked
    for several processes but runs one. `args`: the run's `TrainingArguments` (its `world_size` sets up the devices,
    as `Trainer.__init__` does first)."""
    launched = launched_world_size()
    if launched > 1 and args.world_size == 1 and os.environ.get(ALLOW_INDEPENDENT_ENV) != "1":
        raise LaunchError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}), but accelerate sees one (it runs "
            "distributed on GPUs, and on CPU only with use_cpu): every process would train its own copy on all the "
            f"data and write the same output_dir ({args.output_dir}). On CPU add `--use_cpu true` "
            "(HeadPrepConfig(use_cpu=True)), e.g. `torchrun --nproc_per_node 2 script.py ... --use_cpu true`; on "
            "GPUs check that this process sees them (CUDA_VISIBLE_DEVICES, torch.cuda.is_available()). To run "
            f"independent copies on purpose, set {ALLOW_INDEPENDENT_ENV}=1 and give each its own output_dir."
        )
    # accelerate's simple launcher (one process) sets MASTER_ADDR only when asked for several processes or machines;
    # every other multi-process route goes through torchrun or mpirun, which set a world size.
    accelerate_launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if accelerate_launched and "MASTER_ADDR" in os.environ and launched == 1 and args.world_size == 1:
        if "one_process" not in _warned:
            _warned.add("one_process")
            logger.warning(
                "accelerate launch was asked for several processes but started this script as ONE process: without "
                "--multi_gpu (or a multi-GPU config) it runs one process, also with --cpu or a MULTI_CPU config. "
                "For N processes on GPUs: `accelerate launch --multi_gpu --num_processes N script.py ...`; on CPU: "
                "`accelerate launch --multi_gpu --num_processes N script.py ... --use_cpu true` (or torchrun)."
            )
