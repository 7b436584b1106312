"""specdecode: faster (and, with MTAD, better) LLM generation by drafting and verifying tokens."""

from specdecode.api import SpeculativeDecoder, generate, make_settings
from specdecode.engine import Generation, GenerationResult, GenerationStats
from specdecode.errors import SpecDecodeError
from specdecode.methods import method_names
from specdecode.models import LoadedModel, load_draft, load_model, pair_draft

__all__ = [
    "Generation",
    "GenerationResult",
    "GenerationStats",
    "LoadedModel",
    "SpecDecodeError",
    "SpeculativeDecoder",
    "generate",
    "load_draft",
    "load_model",
    "make_settings",
    "method_names",
    "pair_draft",
]
__version__ = "0.1.0"
