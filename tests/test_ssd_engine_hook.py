"""The engine lends its KV cache to the proposer (self-drafts read the context from it)."""

from specdecode.accept.rules import GreedyMatch
from specdecode.engine.loop import Generation
from specdecode.propose.base import Draft, Proposer
from specdecode.sampling import GenerationSettings
from tiny_models import tiny_model


class _Recorder(Proposer):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.cache = None

    def bind_target_cache(self, target_cache) -> None:
        self.cache = target_cache
        self.events.append(("bind", len(target_cache)))

    def on_prefill(self, prompt_hidden) -> None:
        self.events.append(("prefill", len(self.cache)))

    def propose(self, sequence, max_tokens):
        assert self.cache.token_ids == sequence[:-1]  # the engine's invariant, visible to the drafter
        self.events.append(("propose", len(sequence)))
        return Draft()


def test_engine_binds_its_cache_before_prefill():
    proposer = _Recorder()
    Generation(tiny_model("llama"), [1, 2, 3, 4], proposer, GreedyMatch(), GenerationSettings(max_new_tokens=3),
               "ar").result()
    assert proposer.events == [("bind", 0), ("prefill", 3), ("propose", 4), ("propose", 5), ("propose", 6)]
