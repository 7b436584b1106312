"""What a KNN-SSD bundle build may choose and how it runs: the options of ``build-knn``."""

from __future__ import annotations

from dataclasses import dataclass

from specdecode.errors import InvalidSettingError

VOCAB_SOURCES = ("answers", "answers+prompts")


@dataclass(frozen=True)
class SearchSpace:
    """What a domain's configuration search may choose (see :class:`~specdecode.search.config_search.DraftSpace`)."""

    vocab_sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    vocab_sources: tuple[str, ...] = VOCAB_SOURCES
    int8: tuple[bool, ...] = (False, True)
    threshold: tuple[float, float] = (0.3, 0.95)
    max_draft: tuple[int, int] = (2, 16)

    def __post_init__(self) -> None:
        unknown = [s for s in self.vocab_sources if s not in VOCAB_SOURCES]
        if unknown or not self.vocab_sources:
            raise InvalidSettingError(f"vocabulary sources must be among {', '.join(VOCAB_SOURCES)}, got "
                                      f"{', '.join(self.vocab_sources) or 'none'}")


@dataclass(frozen=True)
class BuildOptions:
    """How a bundle (or one domain of it) is built."""

    anchors_per_category: int = 10
    search_prompts: int = 6
    answer_tokens: int = 48  # greedy target tokens per build prompt: vocabulary text and search replay
    search_tokens: int = 32  # of those, how many the search replays
    space: SearchSpace = SearchSpace()
    iterations: int = 24
    init_points: int = 8
    max_density: float = 0.25
    seed: int = 0
    percentile: float = 95.0
    margin: float = 2.0
    budget_s: float | None = None  # for the whole build (calibration, searches, embedding)
    objective: str = "simulated"
    measure: bool = False  # time each winning configuration with real ssd runs on its search prompts

    def validate(self) -> None:
        if self.search_prompts < 1:
            raise InvalidSettingError(f"search prompts must be >= 1, got {self.search_prompts}")
        if not 1 <= self.search_tokens <= self.answer_tokens:
            raise InvalidSettingError(f"need 1 <= search tokens ({self.search_tokens}) <= answer tokens "
                                      f"({self.answer_tokens})")
        if self.objective != "simulated":
            raise InvalidSettingError("a bundle's configuration search uses the simulated objective (deterministic, "
                                      "timed on the model as loaded)")
