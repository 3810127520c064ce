"""The one place that knows how a model splits into backbone and task head.

Supported without configuration:

* plain timm models (`get_classifier()` names the head),
* `transformers.TimmWrapperForImageClassification` (the wrapped timm model's `get_classifier()`),
* `transformers` `*ForImageClassification` models (the `classifier` attribute: ResNet, ViT, ConvNext, ...),
* any module with a top-level `classifier`, `fc` or `head` submodule (`headprep_hf.models.graph.GCN`: its final
  linear layer; torchvision's DeepLabV3: `classifier`, the ASPP head; its auxiliary head must be off).

A top-level `pre_classifier` (DistilBERT and the other transformers models that put a newly initialised dense layer
before their `classifier`) is part of the head: `["pre_classifier", "classifier"]`; so is the `projector` of the speech
classification models (Wav2Vec2, HuBERT, WavLM, Whisper...: `["projector", "classifier"]`, the mean over frames
between them).

Anything else: pass `head_modules=[...]`. The feature `z` of the paper is the input of the first head module, one
vector per sample for the drift (`reduce_features`): 4-D features (`B, C, H, W`) are averaged over space; sequences
(`B, T, H`) are averaged over their valid positions (the batch's `attention_mask`), unless the head itself reduces
them to one vector per sample (transformers' `*ClassificationHead`, which reads the first token): then that vector,
the input of the head's first linear layer, is z; anything else is flattened per sample.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import find_labels

logger = logging.getLogger(__name__)

# `score`: the head of transformers' decoder models for sequence and token classification (GPT-2, Llama, Mistral,
# Qwen2, ...), looked for last.
_HEAD_ATTRIBUTES = ("classifier", "fc", "head", "score")
# The dense layer some transformers models apply between the pooled features and `classifier` (DistilBERT; the
# multiple-choice models of YOSO, MRA, Nystromformer): newly initialised with the classifier when a base checkpoint is
# loaded, so it trains in HP with it.
_PRE_CLASSIFIER = "pre_classifier"
# The speech models' projection before the mean over frames and their `classifier` (Wav2Vec2, HuBERT, WavLM, SEW,
# UniSpeech, Data2VecAudio `*ForSequenceClassification`, `WhisperForAudioClassification`): new with the classifier too.
# Only in those classification models: `*ForXVector` has a `projector` feeding its TDNN layers.
_PROJECTOR = "projector"
_PROJECTOR_MODELS = ("ForSequenceClassification", "ForAudioClassification")


@dataclass
class ModelSplit:
    """Backbone / head split of a model.

    Attributes:
        head_names: Names (as in `model.named_modules()`) of the modules forming the task head.
        reinit_names: Backbone modules re-initialised and trained with the head during HP.
        num_classes: Output size of the head's last linear layer.
    """

    head_names: list[str]
    reinit_names: list[str] = field(default_factory=list)
    num_classes: int | None = None

    @property
    def feature_module_name(self) -> str:
        """The module whose input is the feature `z` (the first head module)."""
        return self.head_names[0]

    @property
    def trainable_in_hp_names(self) -> list[str]:
        return self.head_names + self.reinit_names

    def _is_under(self, param_name: str, prefixes: list[str]) -> bool:
        return any(param_name == p or param_name.startswith(p + ".") for p in prefixes)

    def is_head_param(self, name: str) -> bool:
        """Whether parameter `name` belongs to the head."""
        return self._is_under(name, self.head_names)

    def is_hp_trainable(self, name: str) -> bool:
        """Whether parameter or buffer `name` trains during HP (head or re-initialised backbone module)."""
        return self._is_under(name, self.trainable_in_hp_names)

    def head_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in model.named_parameters() if self.is_head_param(n))

    def hp_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in model.named_parameters() if self.is_hp_trainable(n))

    def tied_to_backbone(self, model: nn.Module, replaced: str | None = None) -> list[str]:
        """Parameters that train in HP but are shared with a frozen module ("head.weight = backbone.weight"), as
        "hp name and backbone name". PyTorch lists a shared parameter once, under the first name it meets, so
        `hp_parameters` alone cannot tell: listed under the head's name, HP would train the backbone's weight too.
        Only parameters that require a gradient count (HP leaves the others as they are: PEFT's frozen
        `original_module` beside the `modules_to_save` copy it trains); `replaced` names a module whose weights are
        about to be replaced (the layer an MLP head takes the place of)."""
        hp, frozen = {}, {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if not self.is_hp_trainable(name):
                frozen.setdefault(id(param), name)
            elif param.requires_grad and not (replaced and self._is_under(name, [replaced])):
                hp.setdefault(id(param), name)
        return sorted(f"{name} and {frozen[key]}" for key, name in hp.items() if key in frozen)

    def backbone_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters frozen during HP (the backbone minus `reinit_names`)."""
        return ((n, p) for n, p in model.named_parameters() if not self.is_hp_trainable(n))

    def backbone_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Parameters AND buffers frozen during HP, keyed by name (views, clone them to keep a copy)."""
        return {n: t for n, t in model.state_dict(keep_vars=True).items() if not self.is_hp_trainable(n)}

    def hp_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(n) for n in self.trainable_in_hp_names]

    def class_axis_hint(self, model: nn.Module) -> bool | None:
        """Where a head's 3-D logits keep their classes when the shapes cannot tell (`losses.class_axis_last`):
        False (`(N, C, L)`) for a head whose last layer is a convolution (`Conv1d`), True (`(N, L, C)`) for one whose
        last layer is linear (a token classifier), None without either."""
        layers = [
            m
            for m in model.get_submodule(self.head_names[-1]).modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
        ]
        if not layers:
            return None
        return not isinstance(layers[-1], nn.modules.conv._ConvNd)

    def feature_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.feature_module_name)

    def drift_module(self, model: nn.Module) -> nn.Module:
        """The module whose input is the drift's feature `z`, the kept backbone's output: with `reinit_names`, the
        first of them in the model's order (the paper takes re-initialised blocks as part of the head: z = f(x; B) of
        the blocks kept), else the first head module (`feature_module`)."""
        if not self.reinit_names:
            return self.feature_module(model)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        module = model.get_submodule(min(self.reinit_names, key=lambda name: order.get(name, len(order))))
        # PEFT's `ModulesToSaveWrapper` (a re-initialised module trained through `modules_to_save`): the active copy,
        # which its forward calls (the wrapper's `original_module` is not, and a hook below it never fired)
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and hasattr(module, "original_module"):
            active = getattr(module, "active_adapter", None)
            active = active[0] if isinstance(active, (list, tuple)) and active else active
            if isinstance(active, str) and active in copies:
                return copies[active]
        return module

    def head_module(self, model: nn.Module) -> nn.Module:
        """The head as one module, for running it on its cached input (cached HP, head exchange)."""
        if len(self.head_names) != 1:
            raise ValueError(
                f"The head is made of several modules {self.head_names}; running it on cached features (cached HP, "
                "the head exchange) needs a single head module. Name one module in head_modules (e.g. "
                f"head_modules=[{self.head_names[-1]!r}]: the others then stay in the backbone, frozen in HP), or "
                "wrap them into one module where the model applies them one after the other; or leave out what runs "
                "the head alone: uncached head probing (hp_cache_features=False; a sweep: --hp_cache_features false) "
                "and no head exchange (sweep_exchange=False)."
            )
        return model.get_submodule(self.head_names[0])

    def head_logits(
        self,
        model: nn.Module,
        z: torch.Tensor,
        labels: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Logits of the head applied to its input `z`, as the full model would return them.

        Dense (`B, C, h, w`) logits are resized bilinearly to `size` (default: the label map's size) when they differ,
        as segmentation models such as torchvision's DeepLabV3 do after their head.
        """
        logits = extract_logits(self.head_module(model)(z))
        if size is None and labels is not None and labels.dim() == 3:
            size = tuple(labels.shape[-2:])
        if size is not None and logits.dim() == 4 and tuple(logits.shape[-2:]) != tuple(size):
            logits = nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def _name_of(model: nn.Module, module: nn.Module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last `nn.Linear` registered in `module` (the classifier layer of a head), with its relative name."""
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    return found


def _find_head_name(model: nn.Module) -> str | None:
    # timm models and wrappers around one (TimmWrapperForImageClassification keeps it in `.timm_model`).
    for _, sub in model.named_modules():
        get_classifier = getattr(sub, "get_classifier", None)
        if callable(get_classifier):
            try:
                classifier = get_classifier()
            except Exception:  # noqa: BLE001 - a model's own helper failing just means "not this way"
                continue
            if isinstance(classifier, nn.Module) and _has_params(classifier):
                return _name_of(model, classifier)
    for attribute in _HEAD_ATTRIBUTES:
        sub = getattr(model, attribute, None)
        if isinstance(sub, nn.Module) and _has_params(sub):
            return attribute
    return None


def _candidates(model: nn.Module, limit: int = 8) -> list[str]:
    names = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d, nn.Sequential))]
    return names[-limit:]


def module_names_in_wrapper(model: nn.Module, names: list[str] | None) -> list[str]:
    """`names` as paths in `model`: a PEFT model's modules are named by their path in the wrapper
    (`base_model.model.classifier`), and names given as the wrapped model's (`classifier`) are mapped to those; other
    names are kept as given."""
    names = list(names or [])
    base = unwrap_peft_model(model)
    if base is model:
        return names
    prefix = f"{_name_of(model, base)}."
    module_names = {n for n, _ in model.named_modules() if n}
    return [prefix + n if n not in module_names and prefix + n in module_names else n for n in names]


def find_split(
    model: nn.Module, head_modules: list[str] | None = None, reinit_modules: list[str] | None = None
) -> ModelSplit:
    """Split `model` into backbone and head.

    Args:
        model: The model, with its new task head already attached.
        head_modules: Explicit head module names; overrides the automatic detection.
        reinit_modules: Backbone module names re-initialised and trained with the head during HP.

    Raises:
        ValueError: when a named module does not exist, or no head can be found (the message lists candidates).
    """
    module_names = {n for n, _ in model.named_modules() if n}
    # A PEFT model is searched as the model it wraps (as Trainer reads its label names), and its modules named by their
    # path in the wrapper (`base_model.model.classifier`: its attributes reach the wrapped model's, whose names are
    # not the wrapper's); names given as the wrapped model's are taken too.
    base = unwrap_peft_model(model)
    prefix = "" if base is model else f"{_name_of(model, base)}."
    in_wrapper = functools.partial(module_names_in_wrapper, model)

    if isinstance(getattr(model, "aux_classifier", None), nn.Module):
        raise ValueError(
            f"{type(model).__name__} has an auxiliary head (aux_classifier); its output is not the logits the loss "
            "and the measurements use, so it would never train. Build the model with aux_loss=False (or set "
            "model.aux_classifier = None)."
        )
    if head_modules:
        head_names = in_wrapper(list(head_modules))
        missing = [n for n in head_names if n not in module_names]
        if missing:
            raise ValueError(
                f"head_modules {missing} are not modules of {type(model).__name__}. Candidates: {_candidates(model)}."
            )
    else:
        name = _find_head_name(base)
        if not name:
            raise ValueError(
                f"Could not find the task head of {type(base).__name__} (no timm get_classifier(), no top-level "
                f"{'/'.join(_HEAD_ATTRIBUTES)} module with parameters). Set head_modules=[...] in HeadPrepConfig; "
                f"candidate module names: {_candidates(model)}."
            )
        head_names = [name]
        pre = getattr(base, _PRE_CLASSIFIER, None)
        projector = getattr(base, _PROJECTOR, None)
        if name == "classifier" and isinstance(pre, nn.Module) and _has_params(pre):
            head_names = [_PRE_CLASSIFIER, name]
        elif (
            name == "classifier"
            and type(base).__name__.endswith(_PROJECTOR_MODELS)
            and isinstance(projector, nn.Linear)
        ):
            head_names = [_PROJECTOR, name]
        head_names = [prefix + n for n in head_names]

    reinit_names = in_wrapper(list(reinit_modules or []))
    missing = [n for n in reinit_names if n not in module_names]
    if missing:
        raise ValueError(
            f"reinit_modules {missing} are not modules of {type(model).__name__}; use names from "
            f"model.named_modules(), e.g. the last blocks: {_block_names(model)}."
        )
    for n in reinit_names:
        overlap = [h for h in head_names if n == h or n.startswith(h + ".") or h.startswith(n + ".")]
        if overlap:
            raise ValueError(f"reinit_modules entry {n!r} overlaps the head {overlap}; list backbone modules only.")

    split = ModelSplit(head_names=head_names, reinit_names=reinit_names)
    split.num_classes = _num_classes(model, split)
    return split


def _block_names(model: nn.Module, limit: int = 6) -> list[str]:
    names = [n for n, _ in model.named_modules() if n.count(".") in (1, 2) and n.split(".")[-1].isdigit()]
    return names[-limit:]


def _num_classes(model: nn.Module, split: ModelSplit) -> int | None:
    for name in reversed(split.head_names):
        found = last_linear(model.get_submodule(name))
        if found is not None:
            return found[1].out_features
        conv = [m for m in model.get_submodule(name).modules() if isinstance(m, nn.Conv2d)]
        if conv:
            return conv[-1].out_channels
    return None


def reduce_features(z: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample feature vector: spatial mean of 4-D maps (`B, C, H, W`), mean over the valid positions of
    sequences (`B, T, H`; `attention_mask` `(B, T)`, non-zero = valid; without one, every position), flatten
    otherwise.

    A sequence is never flattened: its padded length changes from batch to batch, and padding is not a feature.
    """
    if z.dim() == 4:
        return z.mean(dim=(2, 3))
    if z.dim() == 3:
        if isinstance(attention_mask, torch.Tensor) and tuple(attention_mask.shape) == tuple(z.shape[:2]):
            weight = (attention_mask != 0).to(z.dtype).unsqueeze(-1)
            return (z * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
        return z.mean(dim=1)
    return z.reshape(z.shape[0], -1)


def first_linear(module: nn.Module) -> nn.Linear | None:
    """The first `nn.Linear` registered in `module` (itself included)."""
    return next((sub for sub in module.modules() if isinstance(sub, nn.Linear)), None)


def extract_logits(outputs) -> torch.Tensor:
    """Logits from a model output: a tensor, a dict / `ModelOutput` (its `logits`, torchvision's `out`, else its first
    tensor that is not `loss`, as `Trainer.prediction_step` orders them), or a tuple (first element)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        for key in ("logits", "out"):  # transformers outputs; torchvision segmentation models
            if key in outputs:
                return outputs[key]
        tensors = [v for k, v in outputs.items() if k != "loss" and isinstance(v, torch.Tensor)]
        if tensors:
            return tensors[0]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    raise TypeError(f"Cannot find logits in a model output of type {type(outputs).__name__}.")


def language_model_kind(model: nn.Module) -> str | None:
    """ "encoder-decoder" or "causal" for a transformers generation model (`can_generate()`: T5, BART, Whisper's
    `*ForConditionalGeneration`, GPT-2's `GPT2LMHeadModel`, Llama...), by its config's `is_encoder_decoder`; None for
    any other model, their classification models included (`BartForSequenceClassification`,
    `WhisperForAudioClassification`: per-sample class scores). A generation model's logits are not the scores of the
    labels at the same positions: a causal LM shifts its labels inside the forward, and an encoder-decoder model
    builds its decoder inputs from them."""
    model = unwrap_peft_model(model)  # (a LoRA GPT-2 is a causal LM)
    can_generate = getattr(type(model), "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        return None
    return "encoder-decoder" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "causal"


def forward_label_route(model: nn.Module, label_names: list[str] | None) -> str | None:
    """How `Trainer` hands the model its labels, for a model that computes its own loss from them: "named" (its
    forward has a parameter named like a label, as transformers' `find_labels` reads it: `labels`, `label_ids`, QA's
    `start_positions`...; or one of the declared `label_names`, e.g. `targets`) or "kwargs" (its forward takes
    `**kwargs` and `label_names` is declared); None for a model that takes no labels. A `**kwargs` forward without
    declared label names is taken as one that takes none (a wrapper around a timm model, which `Trainer` cannot train:
    it returns no loss); README "Differences from transformers.Trainer". A PEFT model is read as the model it wraps,
    as Trainer reads its label names."""
    model = unwrap_peft_model(model)
    if find_labels(type(model)):
        return "named"
    if not label_names:
        return None
    params = inspect.signature(model.forward).parameters
    if any(name in params for name in label_names):
        return "named"
    return "kwargs" if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()) else None


class ModelCaller:
    """Calls a model with a batch dict, whatever its forward signature.

    HF models take keyword arguments (`pixel_values=...`); timm models take one positional tensor. The batch's
    labels are not passed (the caller computes the loss from the logits), except to a forward that requires them
    (`forward(x, labels)`, no default): it gets them, as `Trainer` gives them, and its logits are read.

    Attributes:
        positional: The forward takes one required argument, no labels and no `**kwargs` (timm's `forward(x)`, its
            ViTs' `forward(x, attn_mask=None, is_causal=False)`): the one input of a batch is passed positionally,
            whatever its key.
        input_name: That required argument's name (None unless `positional`).
    """

    def __init__(self, model: nn.Module, label_names: list[str]):
        self.label_names = set(label_names)
        params = inspect.signature(model.forward).parameters
        self.accepts_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.param_names = [n for n, p in params.items() if p.kind != inspect.Parameter.VAR_KEYWORD]
        required = [
            n
            for n, p in params.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        self.positional = (
            not self.accepts_kwargs
            and len(required) == 1
            and not any("label" in n for n in self.param_names)
            and all(p.default is not inspect.Parameter.empty for n, p in params.items() if n not in required)
        )
        self.input_name = required[0] if self.positional else None
        self.required_labels = {n for n in required if n in self.label_names}
        self._left_out: set[tuple[str, ...]] = set()  # (key sets a lenient call left out, each named once)

    def __call__(self, model: nn.Module, inputs: dict, lenient: bool = False):
        """The model's output for batch `inputs`. `lenient` (the measurement passes): keys the forward does not take
        are left out, as Trainer's column removal leaves them out (a key that a `compute_loss` of the user's own
        consumes, e.g. a `sample_weight` a collator adds: such a run trains as with Trainer, and is measured)."""
        if not isinstance(inputs, Mapping):
            raise BatchDoesNotFitForward(
                f"The batch is a {type(inputs).__name__}, not a mapping of named inputs, so the trainer cannot call "
                "the model with it itself (as head probing and the measurements do)."
            )
        model_inputs = {k: v for k, v in inputs.items() if k not in self.label_names or k in self.required_labels}
        if self.accepts_kwargs or all(k in self.param_names for k in model_inputs):
            return model(**model_inputs)
        if len(model_inputs) == 1:
            return model(next(iter(model_inputs.values())))
        taken = {k: v for k, v in model_inputs.items() if k in self.param_names}
        if lenient and taken:
            left_out = tuple(sorted(set(model_inputs) - set(taken)))
            if left_out not in self._left_out:
                self._left_out.add(left_out)
                warnings.warn(
                    f"The measurement passes call the model without the batch keys {list(left_out)}, which its "
                    f"forward does not take (it takes {self.param_names}); if a compute_loss of your own passes them "
                    "to the forward under other names, the measurements see another forward than training: rename "
                    "them in the data, or set track_dynamics=False.",
                    UserWarning,
                    stacklevel=2,
                )
            return model(**taken)
        raise BatchDoesNotFitForward(
            f"The batch has keys {sorted(model_inputs)} but the model's forward takes {self.param_names}; rename the "
            "dataset columns to the forward's argument names or return a single input tensor plus 'labels'."
        )

    def lenient(self, model: nn.Module, inputs: dict):
        """`self(model, inputs, lenient=True)`."""
        return self(model, inputs, lenient=True)


class BatchDoesNotFitForward(ValueError):
    """The trainer cannot call the model with a batch itself: not a mapping, or keys the forward does not take."""


class HeadFinder:
    """A model's backbone/head split, looked for on first use and remembered (with its error when there is none).

    Args:
        model: The (unwrapped) model.
        head_modules / reinit_modules: As for `find_split`.
        split: An explicit split; then nothing is looked for.
    """

    def __init__(self, model: nn.Module, head_modules=None, reinit_modules=None, split: ModelSplit | None = None):
        self.model, self.head_modules, self.reinit_modules = model, head_modules, reinit_modules
        self.split, self.error = split, None
        self._searched, self._warned = split is not None, False

    def get(self, required: bool = False, warn: bool = False) -> ModelSplit | None:
        """The split, or None. `required`: raise `find_split`'s error (it names candidate modules and the
        `head_modules` fix). `warn`: log once that the head-based measurements are skipped."""
        if not self._searched:
            self._searched = True
            try:
                self.split = find_split(self.model, self.head_modules, self.reinit_modules)
            except ValueError as error:
                self.error = error
        if self.split is None and required:
            raise self.error
        if self.split is None and warn and not self._warned:
            self._warned = True
            logger.warning(
                "%s Drift and the head gradient norm are not measured; set head_modules=[...] to measure them.",
                self.error,
            )
        return self.split
