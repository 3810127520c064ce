"""The tau sweep (HP tau*-FT, paper section 5.2): one HP run with head snapshots, FT from each, tau* on validation.

Offline default (no arguments): the MNIST-5k source model (pretrained and cached on the first run) and the toy task
(digits 0/1/2 with rotation and zoom), taus 0 1 2 4 8 16 32 with cached-feature HP; prints the table
tau / energy / HP-acc / FT-val and tau*, and writes sweep.json and the plots into runs/sweep-<time>/:

    python recipes/sweep_tau.py
    accelerate launch recipes/sweep_tau.py --sweep_taus 0 2 8 32 --num_train_epochs 10 --output_dir runs/s1

Real inputs, shards and the other steps:

    accelerate launch recipes/sweep_tau.py --model_name_or_path timm/resnet50.a1_in1k --dataset_name cifar10 \\
        --hp_learning_rate 1e-2 --learning_rate 3e-4 --num_train_epochs 20 --sweep_shard 0/2 --output_dir runs/c10_a
    headprep sweep --merge runs/c10_a runs/c10_b --output_dir runs/c10
    headprep exchange runs/c10 && headprep report runs/c10

Every argument of `headprep sweep` works here (this script is that command); `--config settings.yaml` too.
"""

import os
import sys

from headprep_hf.cli import run_command, sweep_main

if __name__ == "__main__":
    run_command(sweep_main, sys.argv[1:], os.path.basename(__file__))
