"""The decoding loop: propose → verify with one target forward → accept → cut caches.

Invariant: the target's KV cache holds every token of the sequence except the last one. A step
feeds ``[last token] + draft`` (k + 1 tokens) and reads k + 1 next-token distributions; after
accepting ``a`` draft tokens and the target's own token, the cache is cropped to the new
sequence minus its last token. A tree draft (several candidates in one forward) first compacts
the cache to its accepted path, which restores the same invariant. The target's final hidden
states at the kept positions go to the drafter (feature-level heads read them). Drafters keep
their own caches and sync them the same way, or (self-drafts) borrow the target's cache during
``propose`` and leave it as they found it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from specdecode.accept.rules import AcceptanceRule
from specdecode.engine.stats import GenerationResult, GenerationStats
from specdecode.engine.stopping import StopChecker
from specdecode.models.loading import LoadedModel
from specdecode.models.runner import Readout
from specdecode.models.tree import keep_path
from specdecode.propose.base import Proposer
from specdecode.sampling import GenerationSettings


def _now(device: torch.device) -> float:
    """Wall clock after the device has finished queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Generation:
    """One request in progress. Iterate it for streamed text, or call :meth:`result`."""

    def __init__(
        self,
        target: LoadedModel,
        prompt_ids: list[int],
        proposer: Proposer,
        rule: AcceptanceRule,
        settings: GenerationSettings,
        method: str,
    ) -> None:
        self.target = target
        self.prompt_ids = list(prompt_ids)
        self.proposer = proposer
        self.rule = rule
        self.settings = settings
        self.method = method
        self.stopper = StopChecker(
            settings.max_new_tokens,
            target.eos_token_ids if settings.stop_at_eos else frozenset(),
            settings.stop_strings,
            target.tokenizer,
        )
        self.generated: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        self.stop_reason: str | None = None
        self._steps = self._run()

    def _run(self) -> Iterator[list[int]]:
        runner, device, stats = self.target.runner, self.target.device, self.stats
        kv = runner.new_cache()
        self.proposer.bind_target_cache(kv)
        start = _now(device)
        with torch.inference_mode():
            if len(self.prompt_ids) > 1:
                self.proposer.on_prefill(runner.forward(kv, self.prompt_ids[:-1], Readout.hidden_only()).hidden)
            stats.prefill_s = _now(device) - start
            sequence = list(self.prompt_ids)
            while self.stop_reason is None:
                t0 = _now(device)
                room = self.settings.max_new_tokens - len(self.generated)
                draft = self.proposer.propose(sequence, max_tokens=room - 1)
                t1 = _now(device)
                fed = [sequence[-1], *draft.tokens]
                out = runner.verify(kv, fed, draft.parents, self.rule.readout(draft))
                t2 = _now(device)
                verdict = self.rule(draft, out.logits)
                kept = list(verdict.path or range(verdict.accepted + 1))
                if draft.parents is not None:
                    keep_path(kv, len(sequence) - 1, kept)
                t3 = _now(device)
                stats.draft_s += t1 - t0
                stats.verify_s += t2 - t1
                stats.accept_s += t3 - t2
                stats.target_forwards += 1
                stats.proposed_tokens += len(draft)
                stats.accepted_lengths.append(verdict.accepted)
                self.proposer.observe(len(draft), verdict.accepted)
                self.proposer.observe_hidden(out.hidden[kept])
                new = [*(fed[i] for i in kept[1:]), verdict.next_token]
                kv.crop(len(sequence) + verdict.accepted)
                new, self.stop_reason = self.stopper.cut(self.generated, new)
                self.generated.extend(new)
                sequence.extend(new)
                yield new
        stats.new_tokens = len(self.generated)
        stats.draft_forwards = self.proposer.stats.forwards
        stats.extra.update(self.proposer.stats.extra)
        stats.total_s = _now(device) - start

    def __iter__(self) -> Iterator[str]:
        """Yield newly decoded text as it is generated (needs a tokenizer)."""
        tokenizer = self.target.tokenizer
        emitted = ""
        for _ in self._steps:
            if tokenizer is None:
                continue
            text = tokenizer.decode(self.generated, skip_special_tokens=True)
            # hold back a trailing partial UTF-8 character until its other bytes arrive
            if text.endswith("\ufffd") and self.stop_reason is None:
                continue
            if len(text) > len(emitted) and text.startswith(emitted):
                yield text[len(emitted):]
                emitted = text

    def result(self) -> GenerationResult:
        for _ in self._steps:
            pass
        text = (
            self.target.tokenizer.decode(self.generated, skip_special_tokens=True)
            if self.target.tokenizer is not None
            else ""
        )
        return GenerationResult(
            text=text,
            token_ids=list(self.generated),
            stats=self.stats,
            method=self.method,
            stop_reason=self.stop_reason or "length",
        )
