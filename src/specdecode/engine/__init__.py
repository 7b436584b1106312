"""The decoding loop, stop conditions and statistics."""

from specdecode.engine.loop import Generation
from specdecode.engine.stats import GenerationResult, GenerationStats
from specdecode.engine.stopping import StopChecker

__all__ = ["Generation", "GenerationResult", "GenerationStats", "StopChecker"]
