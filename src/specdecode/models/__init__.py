"""Model loading, KV caches and forward helpers shared by every decoding method."""

from specdecode.models.cache import KVCache
from specdecode.models.loading import LoadedModel, load_draft, load_model, pair_draft

__all__ = ["KVCache", "LoadedModel", "load_draft", "load_model", "pair_draft"]
