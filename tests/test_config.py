import warnings

import pytest
from transformers import HfArgumentParser

from headprep_hf import HeadPrepConfig, OppositeEnergyWarning


def _config(tmp_path, **kwargs):
    return HeadPrepConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hp_epochs", -1, "hp_epochs must be an integer >= 0"),
        ("hp_epochs", 1.5, "hp_epochs must be an integer >= 0"),
        ("hp_label_smoothing", 1.0, r"hp_label_smoothing must be in \[0, 1\)"),
        ("hp_label_smoothing", -0.1, r"hp_label_smoothing must be in \[0, 1\)"),
        ("ft_label_smoothing", 1.2, r"ft_label_smoothing must be in \[0, 1\)"),
        ("head_type", "transformer", r"head_type must be one of \['linear', 'mlp'\]"),
        ("hp_backbone_mode", "frozen", r"hp_backbone_mode must be one of \['eval', 'train'\]"),
        ("hp_lr_scheduler_type", "reduce_lr_on_plateau", "hp_lr_scheduler_type must be one of"),
        ("mlp_num_layers", 1, "mlp_num_layers must be >= 2"),
        ("drift_probe_samples", 0, "drift_probe_samples must be >= 1"),
        ("label_smoothing_factor", 0.1, "label_smoothing_factor=0.1 smooths both stages"),
        ("ddp_find_unused_parameters", False, "ddp_find_unused_parameters=False cannot be used"),
        ("head_modules", [], "head_modules must be a non-empty list"),
        ("hp_warmup_ratio", 0.2, "hp_warmup_ratio=0.2 has no effect with hp_lr_scheduler_type='constant'"),
    ],
)
def test_invalid_fields_name_the_field(tmp_path, field, value, message):
    extra = {"hp_label_smoothing": 0.2} if field == "label_smoothing_factor" else {}
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **{field: value}, **extra)


def test_defaults(tmp_path):
    args = _config(tmp_path)
    assert args.hp_epochs == 4 and args.head_type == "linear" and args.reinit_modules == []
    # TrainingArguments' defaults stand (the trainer resolves label names and column removal per model) ...
    assert args.label_names is None and args.remove_unused_columns is True
    # ... except that HP needs DDP to tolerate the frozen backbone's missing gradients.
    assert args.ddp_find_unused_parameters is True
    assert _config(tmp_path, hp_epochs=0).ddp_find_unused_parameters is None
    assert _config(tmp_path, hp_epochs=0, ddp_find_unused_parameters=False).ddp_find_unused_parameters is False
    assert args.hp_eta == 1.0


def test_opposite_energy_warns_but_does_not_fail(tmp_path):
    with pytest.warns(OppositeEnergyWarning, match="opposite energy"):
        args = _config(tmp_path, hp_label_smoothing=0.0, ft_label_smoothing=0.1)
    assert args.hp_eta > args.ft_eta
    with warnings.catch_warnings():
        warnings.simplefilter("error", OppositeEnergyWarning)
        _config(tmp_path, hp_label_smoothing=0.2, ft_label_smoothing=0.1)


def test_parser_round_trip(tmp_path):
    parser = HfArgumentParser(HeadPrepConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--hp_epochs",
            "3",
            "--head_type",
            "mlp",
            "--reinit_modules",
            "layer4.0",
            "layer3.0",
            "--head_modules",
            "fc",
            "--hp_label_smoothing",
            "0.1",
            "--use_cpu",
            "true",
        ]
    )
    assert args.hp_epochs == 3 and args.head_type == "mlp"
    assert args.reinit_modules == ["layer4.0", "layer3.0"] and args.head_modules == ["fc"]
    assert args.hp_label_smoothing == 0.1


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_:
        HfArgumentParser(HeadPrepConfig).parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--hp_epochs" in out and "--drift_probe_samples" in out


def test_one_module_name_as_a_string_is_a_list_of_one(tmp_path):
    """A YAML scalar or keyword `reinit_modules: layer4.2` names one module, not eight one-letter ones."""
    args = _config(tmp_path, head_modules="fc", reinit_modules="layer4.2")
    assert args.head_modules == ["fc"] and args.reinit_modules == ["layer4.2"]
