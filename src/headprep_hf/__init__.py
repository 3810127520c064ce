"""headprep_hf: prepare your task head before finetuning (Ren, Guo, Bae, Sutherland, ICLR 2023).

Head probing (HP, backbone frozen) for `hp_epochs` epochs, then finetuning (FT) of everything, inside one
`transformers.Trainer`, with the paper's measurements (energy, p0, feature drift, head gradient norm).
"""

from .config import HeadPrepConfig, OppositeEnergyWarning
from .dynamics import drift_metrics
from .heads import MLPHead, reinitialize_module, replace_head_with_mlp
from .hub import BackboneMismatchWarning, load_prepared_head
from .losses import cross_entropy_energy, smoothed_cross_entropy
from .split import ModelSplit, find_split
from .sweep import SweepConfig, TauSweep, format_table, load_sweep, merge_sweeps
from .trainer import HeadPrepTrainer
from .version import __version__

__all__ = [
    "__version__",
    "BackboneMismatchWarning",
    "HeadPrepConfig",
    "HeadPrepTrainer",
    "MLPHead",
    "ModelSplit",
    "SweepConfig",
    "TauSweep",
    "OppositeEnergyWarning",
    "cross_entropy_energy",
    "drift_metrics",
    "find_split",
    "format_table",
    "load_prepared_head",
    "load_sweep",
    "merge_sweeps",
    "reinitialize_module",
    "replace_head_with_mlp",
    "smoothed_cross_entropy",
]
