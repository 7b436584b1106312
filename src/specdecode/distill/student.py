"""The draft's shape: a few of the target's own layers over a reduced vocabulary (Kangaroo / FR-Spec).

Starting from the target's weights, not from scratch, is what makes a CPU-sized distillation
budget enough: the chosen layers already compute the target's features, the reduced embedding
rows are the target's own, and training only has to teach the shallow stack to finish the job
the skipped layers did. The draft reads its input through the target's full embedding table
(borrowed at pairing time, see ``models.vocab_map``), so only its output is limited to the subset.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models.families import num_layers
from specdecode.models.loading import LoadedModel
from specdecode.models.vocab_map import VocabMap, tokenizer_digest

_LAYER_KEY = re.compile(r"\.(layers|h)\.(\d+)\.")


def build_student(target: LoadedModel, layers: list[int], vocab_ids: list[int],
                  reads_target_embedding: bool = True) -> tuple[nn.Module, VocabMap]:
    """A model of ``target``'s class keeping ``layers`` (target indices) and the ``vocab_ids`` rows.

    The draft's vocabulary is ``vocab_ids`` plus one "unknown" row (the mean of the others), which
    other target tokens read as unless the draft ``reads_target_embedding``. Returns the compact
    model and its map to target ids.
    """
    total = num_layers(target.model)
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= total:
        raise InvalidSettingError(f"draft layers must be distinct indices in [0, {total}), got {layers}")
    vocab_map = VocabMap(tuple(int(t) for t in vocab_ids), target.vocab_size,
                         tokenizer_digest(target.tokenizer) if target.tokenizer is not None else None,
                         reads_target_embedding)
    vocab_map.validate()
    config = copy.deepcopy(target.config)
    text = config.get_text_config()
    text.num_hidden_layers = len(layers)
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in layers]
    text.vocab_size = len(vocab_ids) + 1
    student = type(target.model)(config).to(torch.float32)
    source = target.model.state_dict()
    rows = torch.tensor(vocab_ids, dtype=torch.long)
    embedding_keys = {_param_name(target.model, target.model.get_input_embeddings()),
                      _param_name(target.model, target.model.get_output_embeddings())}
    state = {}
    for key, value in student.state_dict().items():
        match = _LAYER_KEY.search(key)
        origin = key if match is None else key.replace(match.group(0), f".{match.group(1)}.{layers[int(match.group(2))]}.")
        weight = source[origin]
        if origin in embedding_keys:
            kept = weight[rows].float()
            weight = torch.cat([kept, kept.mean(0, keepdim=True)])
        state[key] = weight.to(value.dtype).clone()
    student.load_state_dict(state)
    student.tie_weights()
    return student, vocab_map


def _param_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}.weight"
    return None
