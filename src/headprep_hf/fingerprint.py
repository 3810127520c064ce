"""Content fingerprints of model weights (used by the sweep's shard/resume checks and the prepared-head checksum)."""

from __future__ import annotations

import hashlib
import json
import os

import torch


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and values of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# Module attributes that say how a model runs on a machine, not what it computes (left out of `settings_fingerprint`).
# (timm's `fused_attn` follows TIMM_FUSED_ATTN and the torch build; PEFT's `ephemeral_gpu_offload` a device choice)
_MACHINE_ATTRIBUTES = (
    "training", "grad_checkpointing", "gradient_checkpointing", "name_or_path", "fused_attn", "ephemeral_gpu_offload",
)  # fmt: skip


def _scalar(value) -> bool:
    if isinstance(value, tuple):
        return all(_scalar(v) for v in value)
    return isinstance(value, (bool, int, float, str)) or value is None


def settings_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over what a model computes with besides its weights: each module's class and public scalar attributes
    (dropout rates, timm's `drop_rate`, BatchNorm's momentum and eps, ...) and a transformers model's config (its
    paths and version left out). Two models with equal weights and another dropout rate differ here."""
    described = []
    for name, module in model.named_modules():
        values = {
            key: value
            for key, value in vars(module).items()
            if not key.startswith("_") and key not in _MACHINE_ATTRIBUTES and _scalar(value)
        }
        described.append((name, type(module).__name__, sorted(values.items())))
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
        values = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        described.append(("config", json.dumps(values, sort_keys=True, default=str)))
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


def callable_identity(fn, _depth: int = 0) -> str | None:
    """A description of a function a sweep hands every job (`compute_metrics`, `preprocess_logits_for_metrics`,
    `compute_loss_func`) that is the same wherever and whenever the same code runs: its module and qualified name, a
    digest of its code (so an edited function differs, and two lambdas of one module do), and the simple values it
    holds (a closure's cells, a `functools.partial`'s arguments, a callable object's attributes: numbers, strings and
    tuples of them; anything else by its type). None for None.

    Two sweeps whose jobs computed their metrics with different functions must not be continued into one another:
    the metric of one seed's jobs was accuracy, of the next seed's an error rate, averaged into one tau*."""
    import functools
    import inspect

    if fn is None:
        return None
    if _depth > 3:
        return type(fn).__qualname__
    if isinstance(fn, functools.partial):
        held = [_held(v, _depth) for v in fn.args] + [
            f"{k}={_held(v, _depth)}" for k, v in sorted(fn.keywords.items())
        ]
        return f"partial({callable_identity(fn.func, _depth + 1)}, {', '.join(held)})"
    function = getattr(fn, "__func__", fn)  # (a bound method: its function)
    if inspect.isfunction(function):
        code = function.__code__
        consts = [c for c in code.co_consts if _scalar(c)]
        digest = hashlib.sha256(
            json.dumps([code.co_code.hex(), repr(consts), list(code.co_names)]).encode()
        ).hexdigest()[:16]
        cells = [cell.cell_contents for cell in function.__closure__ or () if _cell_set(cell)]
        held = f"({', '.join(_held(v, _depth) for v in cells)})" if cells else ""
        return f"{function.__module__}.{function.__qualname__}[{digest}]{held}"
    if inspect.isbuiltin(function) or not hasattr(fn, "__dict__"):  # (compiled code: its name says it)
        return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    cls = type(fn)  # a callable object: its class's __call__ and its attributes
    attributes = ", ".join(f"{k}={_held(v, _depth)}" for k, v in sorted(vars(fn).items()) if not k.startswith("_"))
    call = callable_identity(cls.__call__, _depth + 1)  # (callable: checked by the caller)
    return f"{cls.__module__}.{cls.__qualname__}({attributes}){{{call}}}"


def _cell_set(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _held(value, depth: int) -> str:
    # (an absolute path by its last component, as the sweep's task record: shards from machines with other mount
    # points merge; a list or dict by its type: its contents may be state the function keeps, e.g. a history)
    if isinstance(value, str) and os.path.isabs(value):
        return repr(os.path.basename(os.path.normpath(value)))
    if _scalar(value):
        return repr(value)
    if isinstance(value, tuple) and all(_scalar(v) for v in value):
        return repr(value)
    if callable(value) and not isinstance(value, type):
        return callable_identity(value, depth + 1)
    return f"<{type(value).__qualname__}>"
