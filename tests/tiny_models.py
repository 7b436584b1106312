"""Tiny randomly initialised causal LMs of every supported architecture (no download).

float64 weights keep argmax ties out of the lossless checks: a multi-token verification forward
and a one-token forward agree to ~1e-15, far below any real gap between logits.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from specdecode.models.loading import LoadedModel

VOCAB = 97
ARCHITECTURES = ("llama", "qwen2", "gemma3", "gpt2")
# the other families of models/families.py (tested in test_families.py), and one outside the table
OTHER_FAMILIES = ("qwen3", "mistral")
UNSUPPORTED = "opt"


def tiny_config(arch: str, vocab: int = VOCAB, layers: int = 4) -> PretrainedConfig:
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=None, pad_token_id=None)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           initializer_range=0.3, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           initializer_range=0.3, **common)
    if arch == "gemma3":
        # window 8 and a mix of sliding / global layers: rollbacks cross the window constantly
        return Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                sliding_window=8, max_position_embeddings=2048,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "sliding_attention"][:layers] + ["full_attention"] * max(0, layers - 4),
                                initializer_range=0.3, **common)
    if arch in ("qwen3", "mistral"):
        config = Qwen3Config if arch == "qwen3" else MistralConfig
        return config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, initializer_range=0.3,
                      **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=2048, word_embed_proj_dim=32, init_std=0.3, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=2048, initializer_range=0.3,
                          vocab_size=vocab, bos_token_id=0, eos_token_id=None)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB, layers: int = 4) -> LoadedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, layers), dtype=torch.float64)
    model.generation_config.eos_token_id = None
    return LoadedModel(model=model, tokenizer=None, name=f"tiny-{arch}-{seed}")


def perturbed_copy(loaded: LoadedModel, scale: float, seed: int = 1) -> LoadedModel:
    """A draft close to the target: same weights plus noise, so it agrees often but not always."""
    model = AutoModelForCausalLM.from_config(loaded.model.config, dtype=torch.float64)
    model.load_state_dict(loaded.model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    model.generation_config.eos_token_id = None
    return LoadedModel(model=model, tokenizer=None, name=f"{loaded.name}-perturbed")
