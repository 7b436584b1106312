"""The model families specdecode knows, in one table: where each keeps its layers and which parts
of the runtime run it.

Every part that depends on a model's architecture reads this table: the layer-skip view (where the
decoder layers and their sub-layers live), the native decoder (which families it computes with
the same floats as `transformers`) and the runtime (which heads it screens). Adding a family is
one :class:`Family` entry plus its tiny-model tests. A model of any other type still loads and
decodes on the plain `transformers` path; only what needs the layout (self-drafting, the native
decoder) refuses it, in one line naming the supported families.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from specdecode.errors import InvalidSettingError


@dataclass(frozen=True)
class Family:
    """One architecture family as the runtime sees it."""

    name: str
    stack: str  # attribute of the causal-LM wrapper holding the decoder stack
    layers: str  # attribute of the stack holding the ModuleList of decoder layers
    attention: str  # attribute of a decoder layer holding its attention sub-layer
    mlp: str  # ... and its MLP sub-layer
    native: bool  # models/native.py computes it (RMSNorm pre-norm decoder, rotary, q/k/v + gate/up)
    gemma_norms: bool = False  # RMSNorm multiplies by (1 + w) in float32 before casting back


FAMILIES: dict[str, Family] = {
    "gemma3_text": Family("Gemma 3", "model", "layers", "self_attn", "mlp", native=True, gemma_norms=True),
    "llama": Family("Llama", "model", "layers", "self_attn", "mlp", native=True),
    "qwen2": Family("Qwen 2", "model", "layers", "self_attn", "mlp", native=True),
    "qwen3": Family("Qwen 3", "model", "layers", "self_attn", "mlp", native=False),
    "mistral": Family("Mistral", "model", "layers", "self_attn", "mlp", native=False),
    "gpt2": Family("GPT-2", "transformer", "h", "attn", "mlp", native=False),
}


def model_type(model: nn.Module) -> str | None:
    return getattr(model.config.get_text_config(), "model_type", None)


def family_or_none(model: nn.Module) -> Family | None:
    """The model's family, or None for an architecture outside the table."""
    return FAMILIES.get(model_type(model))


def family_of(model: nn.Module, needed_for: str = "this") -> Family:
    """The model's family; one line naming the supported families for any other model."""
    family = family_or_none(model)
    if family is None:
        supported = ", ".join(f"{f.name} ({key})" for key, f in FAMILIES.items())
        raise InvalidSettingError(f"{needed_for} does not support model type {model_type(model)!r} "
                                  f"(supported families: {supported})")
    return family


def runs_natively(model: nn.Module) -> bool:
    """Whether the native decoder computes ``model`` (a supported family without the options it lacks)."""
    family = family_or_none(model)
    config = model.config.get_text_config()
    return (family is not None and family.native
            and not getattr(config, "attn_logit_softcapping", None)
            and not getattr(config, "use_bidirectional_attention", False)
            and hasattr(model, "base_model"))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, or of a bare decoder stack (a draft head's layers)."""
    family = family_of(model, "layer skipping")
    return getattr(getattr(model, family.stack, model), family.layers)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def sublayers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The (attention, MLP) sub-layer pair of every decoder layer."""
    family = family_of(model, "layer skipping")
    return [(getattr(layer, family.attention), getattr(layer, family.mlp)) for layer in decoder_layers(model)]
