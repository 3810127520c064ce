#!/usr/bin/env bash
# The GPU benchmarks of issue 15 as ONE prepared device run (at most 9 minutes: each part has its own time limit;
# the `device` tool's `run` gives at most 10 minutes per command and 15 per session, the machine's start included):
#
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=590)
#   run(command="bash bench/gpu.sh classification", ...)   # one task only (classification | segmentation)
#   run(command="bash bench/gpu.sh memory segmentation", ...)   # classification in memory only, and segmentation
#   run(command="bash bench/gpu.sh syncs", ...)   # raw loop against Trainer at logging_steps 5 and 1000, both tasks
#   run(command="bash bench/gpu.sh profile", ...)   # where each side's update time goes, both tasks (about 4 min)
#   run(command="bash bench/gpu.sh memoryworkers", ...)   # in memory: main process against 2 workers (~5 min)
#   run(command="bash bench/gpu.sh persistence", ...)   # in memory: 2 workers started anew each epoch or kept (~4 min)
#
# A 15-minute lease: `bash bench/gpu.sh classification segmentation` (timeout_s=590: about 5 minutes on the H200,
# the machine's start not counted); `profile` and `syncs` are for a second lease. In memory the recipe's rule now
# loads with 2 pinned workers on a CUDA device (`recipe_num_workers`), not persistent (an exact epoch-end resume): in
# the main process the GPU idled at each logging step's host sync while the next batch was collated and pinned (H200,
# 2026-11-28, `memoryworkers`: plain Trainer 0.944 -> 0.991 of the raw loop with persistent workers, 0.975 with the
# recipe's, `persistence`).
#
# The device image has torch, torchvision, accelerate, timm and transformers, but maybe not the versions this
# project pins, and no `datasets` (the JPEG parts read the folder through it). Wheels in .whl/ (ignored by git:
# `echo /.whl/ >> .git/info/exclude`) are installed into /tmp/site first; on 2026-11-27 (H200 image: transformers
# 5.17, no datasets) these were needed, fetched for Python 3.12 as the device README says:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 timm==1.0.31 datasets==5.2.0 dill==0.4.1 \
#       multiprocess==0.70.19
# A missing package stops the script before any part runs (a lease is not spent on a part that cannot start).
# Results land in $OUT (or ./gpu_results): the JSON of each run and the whole log. Each part has its own time limit
# so that one slow part cannot eat the rest.
set -uo pipefail
TASKS="${*:-classification segmentation}"
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'PY' || exit 3
import importlib, sys
try:
    from packaging.version import Version
except ImportError:
    sys.exit("bench/gpu.sh: carry a wheel in .whl/ for: packaging (see the comment at the top)")
missing = []
for name, least in [("torch", None), ("timm", "1.0.15"), ("transformers", "5.19"), ("accelerate", "1.0"),
                    ("datasets", "3.0")]:
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        missing.append(f"{name} (not importable: {err})")
        continue
    if least and Version(module.__version__) < Version(least):
        missing.append(f"{name} {module.__version__} (headprep_hf needs >= {least})")
if missing:
    sys.exit("bench/gpu.sh: carry wheels in .whl/ for: " + "; ".join(missing) + " (see the comment at the top)")
PY
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, timm, accelerate as a; \
                print(torch.__version__, transformers.__version__, timm.__version__, a.__version__)"
    # 1. ResNet-50 at 224 px, bf16: (c)/(a) on in-memory uint8 (the issue's acceptance 3), 5 repeats, then the host
    #    synchronisations per update; 2. the same over the JPEG folder (the default pipeline; loader-bound on 8
    #    workers), sides (a)-(c), 3 repeats. Each writes its JSON after every repeat, so a part stopped by its limit
    #    keeps what ran.
    part() { local limit=$1; shift; local t=$SECONDS; timeout "$limit" python3 bench/throughput.py --device cuda "$@"; \
             echo "== part done: rc $?, $((SECONDS - t)) s of $limit"; }
    # 0. Where the time of an update goes: the raw loop, Trainer and HeadPrepTrainer's FT stage under torch.profiler
    #    over the measured updates in memory; per update the device's busy time and the kernels that differ from the
    #    raw loop's (layout transposes, copies, norms), for both tasks.
    if [[ " $TASKS " == *" profile "* ]]; then
        part 120 --data memory --sides raw_timm trainer headprep_ft --profile 6 --json "$OUT/profile_classification.json"
        part 120 --task segmentation --data memory --sides raw_timm trainer headprep_ft --profile 6 \
            --json "$OUT/profile_segmentation.json"
    fi
    if [[ " $TASKS " == *" classification "* || " $TASKS " == *" memory "* ]]; then
        # (c) with its measurements off too: what the measurements cost beside the trainer's own update.
        part 170 --data memory --sides raw_timm trainer headprep_ft headprep_ft_off headprep_hp --repeats 5 \
            --json "$OUT/classification_memory.json"
    fi
    if [[ " $TASKS " == *" classification "* ]]; then
        part 170 --data jpeg --sides raw_timm trainer headprep_ft --repeats 3 --json "$OUT/classification_jpeg.json"
    fi
    # In memory, the recipe's rule (main process) against 2 persistent pinned workers, then 2 workers at
    # logging_steps 50 (the README's advice for real data): three parts of one call, so the ratios compare.
    if [[ " $TASKS " == *" memoryworkers "* ]]; then
        part 150 --data memory --sides raw_timm trainer headprep_ft headprep_ft_off --repeats 5 --memory_workers 0 \
            --json "$OUT/classification_memory_workers0.json"
        part 150 --data memory --sides raw_timm trainer headprep_ft headprep_ft_off --repeats 5 --memory_workers 2 \
            --json "$OUT/classification_memory_workers2.json"
        part 120 --data memory --sides raw_timm trainer headprep_ft --repeats 5 --memory_workers 2 \
            --logging_steps 50 --json "$OUT/classification_memory_workers2_log50.json"
    fi
    # In memory, the recipe's 2 workers started anew each epoch (not persistent: an exact epoch-end resume) against
    # persistent ones, alternated as three parts of one call (non-persistent, persistent, non-persistent).
    if [[ " $TASKS " == *" persistence "* ]]; then
        for variant in "" --memory_persistent_workers ""; do
            part 90 --data memory --sides raw_timm trainer headprep_ft --repeats 3 $variant \
                --json "$OUT/classification_memory_persistence_${SECONDS}.json"
        done
    fi
    # 3. DeepLabV3 (ResNet-50, output stride 8) at 513 px, bf16, in memory and over the VOC-layout JPEG folder.
    if [[ " $TASKS " == *" segmentation "* ]]; then
        part 200 --task segmentation --repeats 2 --json "$OUT/segmentation.json"
    fi
    # 4. What plain Trainer's gap to the raw loop is made of: its logging steps read the loss and gradient norm from
    #    the device (a host synchronisation that drains the GPU's queue); at logging_steps 1000 the window has none.
    if [[ " $TASKS " == *" syncs "* ]]; then
        for steps in 5 1000; do
            part 100 --data memory --sides raw_timm trainer --repeats 5 --logging_steps $steps \
                --json "$OUT/syncs_classification_$steps.json"
            part 120 --task segmentation --data memory --sides raw_timm trainer --repeats 3 --logging_steps $steps \
                --json "$OUT/syncs_segmentation_$steps.json"
        done
    fi
} 2>&1 | tee "$OUT/gpu.log"
