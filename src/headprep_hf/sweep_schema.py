"""JSON schemas of the files a tau sweep writes: `sweep.json` and `exchange.json` (documented in the README).

`validate_sweep(data)` / `validate_exchange(data)` raise `jsonschema.ValidationError` naming the offending path;
`validate_sweep_file(data, path)` / `validate_exchange_file(data, path)` also name the file (and say when it was
written by a newer headprep_hf). NaN/inf values are written as null.
"""

from __future__ import annotations

from typing import Any

SWEEP_FORMAT_VERSION = 2  # 1: one seed, no statistics (still read: `sweep.upgrade_sweep`)

_NUMBER_OR_NULL = {"type": ["number", "null"]}

_METRICS = {
    "type": "object",
    "description": "Metrics of one evaluation, keys without the eval_/test_ prefix (e.g. accuracy, loss).",
    "additionalProperties": {"type": ["number", "null"]},
}

_DRIFT = {
    "type": "object",
    "description": "Feature drift at the end of FT on the probe set (means over samples; null: not finite).",
    "required": ["sq_dist", "dot", "sq_norm", "cos", "step"],
    "properties": {
        "sq_dist": {"type": ["number", "null"], "description": "mean ||z_t - z_0||^2"},
        "dot": {"type": ["number", "null"], "description": "mean z_t . z_0"},
        "sq_norm": {"type": ["number", "null"], "description": "mean ||z_t||^2"},
        "cos": {"type": ["number", "null"], "description": "mean cos(z_t, z_0)"},
        "step": {"type": "integer", "minimum": 0},
        "epoch": _NUMBER_OR_NULL,
    },
}

_HISTOGRAM = {
    "type": "object",
    "required": ["edges", "counts"],
    "properties": {
        "edges": {"type": "array", "items": {"type": "number"}, "minItems": 2},
        "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    },
}

_CURVE_POINT = {
    "type": "object",
    "required": ["step", "value"],
    "properties": {"step": {"type": "integer"}, "epoch": _NUMBER_OR_NULL, "value": _NUMBER_OR_NULL},
}

_TAU_RESULT = {
    "type": "object",
    "description": "One FT job: finetuning from the head snapshot after tau HP epochs.",
    "required": [
        "tau",
        "hp_train_accuracy",
        "energy",
        "p0_mean",
        "p0_histogram",
        "drift",
        "validation",
        "test",
        "head_grad_norm",
        "output_dir",
    ],
    "properties": {
        "tau": {"type": "integer", "minimum": 0},
        "hp_train_accuracy": {"type": "number", "minimum": 0, "maximum": 1},
        "energy": {"type": "number", "minimum": 0, "description": "mean ||e_y - p_0||_2 over the training set"},
        "p0_mean": {"type": "number", "minimum": 0, "maximum": 1},
        "p0_histogram": _HISTOGRAM,
        "drift": {"anyOf": [_DRIFT, {"type": "null"}]},
        "validation": _METRICS,
        "test": {"anyOf": [_METRICS, {"type": "null"}]},
        "head_grad_norm": {"type": "array", "items": _CURVE_POINT},
        "output_dir": {"type": "string", "description": "FT job folder, relative to the sweep folder."},
        "train_runtime": {"type": "number", "minimum": 0},
        "problem_type": {
            "type": ["string", "null"],
            "description": "The problem type the energy was computed for (headprep_dynamics.json's).",
        },
        "model_sha256": {
            "type": "string",
            "description": "sha256 of the job's model.safetensors (checked before the head exchange reads it).",
        },
        "energy_views": {
            "enum": ["as training reads them", "eval transform", "energy_dataset"],
            "description": "which views of the training set the energy, HP train accuracy and p0 were measured on",
        },
    },
}

_SUMMARY_ROW = {
    "type": "object",
    "required": ["tau", "validation", "test"],
    "properties": {
        "tau": {"type": "integer", "minimum": 0},
        "validation": _NUMBER_OR_NULL,
        "test": _NUMBER_OR_NULL,
        "n": {"type": "integer", "minimum": 0, "description": "Seeds the validation mean is over."},
        "n_test": {
            "type": "integer",
            "minimum": 0,
            "description": "Seeds the test mean is over (its own: a seed's "
            "test value may be missing or not finite where its validation value is not).",
        },  # fmt: skip
    },
}

SWEEP_SCHEMA_V1: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "headprep_hf tau sweep (sweep.json), format 1",
    "type": "object",
    "required": [
        "format_version",
        "headprep_version",
        "taus",
        "selection_metric",
        "greater_is_better",
        "tau_star",
        "results",
        "summary",
        "hp",
        "fingerprint",
        "shard",
    ],
    "properties": {
        "format_version": {"const": 1},
        "headprep_version": {"type": "string"},
        "taus": {
            "type": "array",
            "description": "The whole grid of HP epochs, sorted, without duplicates.",
            "items": {"type": "integer", "minimum": 0},
            "minItems": 1,
        },
        "selection_metric": {"type": "string", "description": "Validation metric that picks tau*, e.g. accuracy."},
        "greater_is_better": {"type": "boolean"},
        "tau_star": {
            "type": ["integer", "null"],
            "description": "argmax (argmin for losses) of the selection metric; null when only part of the grid ran.",
        },
        "complete": {"type": "boolean", "description": "Every tau of the grid has a result."},
        "results": {"type": "array", "items": _TAU_RESULT, "description": "One entry per finished tau, by tau."},
        "evaluation": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "The functions the jobs were evaluated with (compute_metrics, ...), as "
            "fingerprint.callable_identity describes them; a continued or merged sweep must share them.",
        },
        "summary": {
            "type": "object",
            "description": "Paper Table 1 columns: HP0-FT (tau=0), HPmax-FT (largest tau), HPtau*-FT.",
            "properties": {
                "HP0-FT": {"anyOf": [_SUMMARY_ROW, {"type": "null"}]},
                "HPmax-FT": {"anyOf": [_SUMMARY_ROW, {"type": "null"}]},
                "HPtau*-FT": {"anyOf": [_SUMMARY_ROW, {"type": "null"}]},
            },
        },
        "hp": {
            "type": "object",
            "description": "The single HP run to the largest tau that produced every head snapshot.",
            "required": ["cached_features", "runtime"],
            "properties": {
                "cached_features": {"type": "boolean"},
                "cache_views": {"type": "integer", "minimum": 1},
                "runtime": {"type": "number", "minimum": 0},
                "snapshots": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "fingerprint": {
            "type": "object",
            "description": "What shards of one sweep must share to be merged.",
            "required": ["taus", "model", "config"],
            "properties": {
                "taus": {"type": "array", "items": {"type": "integer"}},
                "model": {"type": "string"},
                "config": {"type": "string"},
            },
        },
        "shard": {
            "anyOf": [
                {
                    "type": "object",
                    "required": ["index", "count"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "count": {"type": "integer", "minimum": 1},
                    },
                },
                {"type": "null"},
            ]
        },
        "merged_from": {"type": "array", "items": {"type": "string"}},
        "task": {"type": ["object", "null"], "description": "Task name and arguments, to rebuild data and model."},
        "settings": {"type": "object", "description": "HP/FT settings shared by every FT job."},
    },
}

_STATS = {
    "anyOf": [
        {
            "type": "object",
            "description": "Over the seeds: n, mean, sample standard deviation (n-1), two-sided 95% Student-t "
            "interval of the mean, and the values themselves (std and ci95 null for one value).",
            "required": ["n", "mean", "std", "ci95", "values"],
            "properties": {
                "n": {"type": "integer", "minimum": 1},
                "mean": {"type": "number"},
                "std": _NUMBER_OR_NULL,
                "ci95": {"anyOf": [{"type": "array", "items": {"type": "number"}, "minItems": 2}, {"type": "null"}]},
                "values": {"type": "array", "items": {"type": "number"}},
                "seeds": {"type": "array"},
            },
        },
        {"type": "null"},
    ]
}

_JOB_RESULT = {
    **_TAU_RESULT,
    "description": "One FT job: finetuning from the head snapshot after tau HP epochs of one seed.",
    "required": [*_TAU_RESULT["required"], "seed"],
    "properties": {
        **_TAU_RESULT["properties"],
        "seed": {"type": ["integer", "null"], "description": "null: a format-1 sweep (the model's head as given)"},
        "hp_train_accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "energy": {"type": ["number", "null"], "minimum": 0},
        "p0_mean": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "p0_histogram": {"anyOf": [_HISTOGRAM, {"type": "null"}]},
    },
}

_PER_TAU = {
    "type": "object",
    "required": ["tau", "seeds", "validation", "test", "energy", "hp_train_accuracy", "p0_mean", "drift"],
    "properties": {
        "tau": {"type": "integer", "minimum": 0},
        "seeds": {"type": "array"},
        "validation": _STATS,
        "test": _STATS,
        "energy": _STATS,
        "hp_train_accuracy": _STATS,
        "p0_mean": _STATS,
        "drift": {"type": "object", "additionalProperties": _STATS},
    },
}

_COMPARISON = {
    "anyOf": [
        {
            "type": "object",
            "description": "tau against `against`: the paired differences over seeds (tau - against) of the "
            "validation and test metric, and a verdict sentence for each.",
            "required": ["tau", "against", "validation", "test"],
            "properties": {
                "tau": {"type": "integer"},
                "against": {"type": "integer"},
                "validation": _STATS,
                "test": _STATS,
                "validation_verdict": {"type": "string"},
                "test_verdict": {"type": "string"},
            },
        },
        {"type": "null"},
    ]
}

_SUMMARY_ROW_V2 = {
    **_SUMMARY_ROW,
    "properties": {**_SUMMARY_ROW["properties"], "n": {"type": "integer", "minimum": 0}},
}

SWEEP_SCHEMA: dict[str, Any] = {
    **SWEEP_SCHEMA_V1,
    "title": "headprep_hf tau sweep (sweep.json), format 2: replicated over seeds",
    "required": [*SWEEP_SCHEMA_V1["required"], "seeds", "per_tau", "comparisons"],
    "properties": {
        **SWEEP_SCHEMA_V1["properties"],
        "format_version": {"const": SWEEP_FORMAT_VERSION},
        "seeds": {"type": "array", "items": {"type": "integer"}, "description": "The seeds of the grid."},
        "tau_star": {
            "type": ["integer", "null"],
            "description": "best mean validation metric over seeds; null when only part of the grid ran, or when no "
            "tau has a finite validation metric (tau_star_note says why).",
        },
        "tau_star_note": {
            "type": ["string", "null"],
            "description": "Why tau* is null in a complete sweep, or that it was chosen among the taus with the most "
            "seeds of a finite validation metric; null otherwise.",
        },
        "results": {"type": "array", "items": _JOB_RESULT, "description": "One entry per finished (tau, seed)."},
        "per_tau": {"type": "array", "items": _PER_TAU, "description": "Statistics over the seeds of each tau."},
        "comparisons": {
            "type": "object",
            "description": "tau* against the first (usually 0) and the last tau of the grid, paired over seeds.",
            "properties": {"vs_first": _COMPARISON, "vs_last": _COMPARISON},
        },
        "summary": {
            "type": "object",
            "description": "Paper Table 1 columns (means over seeds): HP0-FT, HPmax-FT, HPtau*-FT.",
            "properties": {
                "HP0-FT": {"anyOf": [_SUMMARY_ROW_V2, {"type": "null"}]},
                "HPmax-FT": {"anyOf": [_SUMMARY_ROW_V2, {"type": "null"}]},
                "HPtau*-FT": {"anyOf": [_SUMMARY_ROW_V2, {"type": "null"}]},
            },
        },
        "hp": {
            "type": "object",
            "description": "The HP runs (one per seed) that produced the head snapshots.",
            "required": ["cached_features", "seeds"],
            "properties": {
                "cached_features": {"type": "boolean"},
                "cache_views": {"type": "integer", "minimum": 1},
                "seeds": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["runtime", "snapshots"],
                        "properties": {
                            "runtime": _NUMBER_OR_NULL,
                            "snapshots": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
        "fingerprint": {
            **SWEEP_SCHEMA_V1["properties"]["fingerprint"],
            "properties": {
                **SWEEP_SCHEMA_V1["properties"]["fingerprint"]["properties"],
                "seeded_heads": {"type": "boolean"},
                "model_settings": {
                    "type": "string",
                    "description": "sha256 of the modules' scalar settings and a transformers config (not in "
                    "earlier files)",
                },
                "task": {"type": ["string", "null"], "description": "sha256 of the task record (null: none)"},
                "data": {
                    "type": "object",
                    "description": "Per set (train, validation, test): its length and the sha256 of its label array "
                    "where the dataset exposes one (null otherwise); null for a set not given.",
                    "additionalProperties": {
                        "anyOf": [
                            {
                                "type": "object",
                                "properties": {
                                    "length": {"type": ["integer", "null"]},
                                    "labels": {"type": ["string", "null"]},
                                    "content": {
                                        "type": "string",
                                        "description": "sha256 of what its items hold besides labels, where cheap: "
                                        "local image files' names and sizes, graphs' tensors",
                                    },
                                },
                            },
                            {"type": "null"},
                        ]
                    },
                },
            },
        },
    },
}

EXCHANGE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "headprep_hf head exchange (exchange.json)",
    "type": "object",
    "required": ["taus", "train_accuracy", "validation_accuracy"],
    "properties": {
        "taus": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        "seed": {"type": ["integer", "null"], "description": "the seed whose FT jobs the matrix pairs (the first)"},
        "sweep_fingerprint": {
            "type": ["string", "null"],
            "description": "sha256 of the sweep.json fingerprint it was measured for (a report skips it otherwise)",
        },
        "models": {
            "type": "object",
            "description": "per tau (a string key), the sha256 of the finetuned model.safetensors it paired, or null "
            "where sweep.json recorded none; a report skips the matrix where sweep.json's differ (a job run again)",
            "additionalProperties": {"type": ["string", "null"]},
        },
        "rows": {"const": "backbone"},
        "columns": {"const": "head"},
        "train_views": {
            "enum": ["eval transform", "as training reads them"],
            "description": "which views of the training set train_accuracy was measured on",
        },
        "train_accuracy": {
            "type": "array",
            "description": "[i][j]: backbone finetuned from tau_i with the head finetuned from tau_j.",
            "items": {"type": "array", "items": {"type": ["number", "null"]}},
        },
        "validation_accuracy": {"type": "array", "items": {"type": "array", "items": {"type": ["number", "null"]}}},
    },
}


def validate_sweep(data: dict) -> None:
    """Raise `jsonschema.ValidationError` unless `data` is a valid `sweep.json`."""
    import jsonschema

    if not isinstance(data, dict):  # (`data.get` raised an AttributeError for a file holding [] or a string)
        raise jsonschema.ValidationError(f"{type(data).__name__} is not of type 'object'")
    jsonschema.validate(data, SWEEP_SCHEMA_V1 if data.get("format_version") == 1 else SWEEP_SCHEMA)


def validate_sweep_file(data: dict, path) -> None:
    """`validate_sweep` of the file `path`: the error names the file, and a format newer than this version reads says
    it was written by a newer headprep_hf."""
    import jsonschema

    from .version import __version__

    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SWEEP_FORMAT_VERSION:
        raise jsonschema.ValidationError(
            f"{path} has format_version {version}, written by a newer headprep_hf; headprep_hf {__version__} reads "
            f"formats 1 to {SWEEP_FORMAT_VERSION}. Upgrade headprep_hf to read it."
        )
    try:
        validate_sweep(data)
    except jsonschema.ValidationError as error:
        error.message = (
            f"{path} is not a valid sweep.json ({error.message}); it was edited or damaged: rerun the sweep (or "
            "this shard) into a fresh output_dir to rewrite it."
        )
        raise error.with_traceback(None) from None  # (raised here: the command line shows one line)


def validate_exchange_file(data: dict, path) -> None:
    """`validate_exchange` of the file `path`: the error names the file."""
    import jsonschema

    try:
        validate_exchange(data)
    except jsonschema.ValidationError as error:
        error.message = (
            f"{path} is not a valid exchange.json ({error.message}); delete it and rerun `headprep exchange` on the "
            "sweep folder to rewrite it."
        )
        raise error.with_traceback(None) from None  # (raised here: the command line shows one line)


def validate_exchange(data: dict) -> None:
    """Raise `jsonschema.ValidationError` unless `data` is a valid `exchange.json`."""
    import jsonschema

    jsonschema.validate(data, EXCHANGE_SCHEMA)
