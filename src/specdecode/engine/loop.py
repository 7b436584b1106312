"""The decoding loop: propose → verify with one target forward → accept → cut caches.

Invariant: the target's KV cache holds every token of the sequence except the last one. A step
feeds ``[last token] + draft`` (k + 1 tokens) and reads k + 1 next-token distributions; after
accepting ``a`` draft tokens and the target's own token, the cache is cropped to the new
sequence minus its last token. A tree draft (several candidates in one forward) first compacts
the cache to its accepted path, which restores the same invariant. The target's final hidden
states at the kept positions go to the drafter (feature-level heads read them). Drafters keep
their own caches and sync them the same way, or (self-drafts) borrow the target's cache during
``propose`` and leave it as they found it.

A step is three calls — :meth:`Generation.propose`, the verification forward,
:meth:`Generation.accept` — so that ``engine/batch.py`` can verify several generations' steps in
one forward; iterating a generation runs its steps alone (a batch of one).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from specdecode.accept.rules import AcceptanceRule
from specdecode.engine.stats import GenerationResult, GenerationStats
from specdecode.engine.stopping import StopChecker
from specdecode.models.loading import LoadedModel
from specdecode.models.cache import KVCache
from specdecode.models.runner import Forward, Readout
from specdecode.models.tree import keep_path
from specdecode.propose.base import Draft, Proposer
from specdecode.sampling import GenerationSettings


def _now(device: torch.device) -> float:
    """Wall clock after the device has finished queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Step:
    """A proposed step: the draft, the ids it feeds (``[last token, *draft]``), what the rule reads."""

    draft: Draft
    fed: list[int]
    readout: Readout


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
        self.kv: KVCache | None = None  # the target's cache, made by :meth:`prefill`
        self.sequence = list(self.prompt_ids)
        self._emitted = ""  # text streamed so far
        # made on first iteration: an unstarted generator's frame holds ``self``, a reference cycle
        # that kept every batched request's KV cache alive until Python's cycle collector ran
        self._steps: Iterator[list[int]] | None = None

    # One step in three parts, so that engine/batch.py can verify several generations in one forward.

    def prefill(self) -> None:
        """Make the target's cache and fill it with the prompt but its last token (the invariant)."""
        ids = self.begin()
        with torch.inference_mode():
            hidden = self.target.runner.forward(self.kv, ids, Readout.hidden_only()).hidden if ids else None
        self.prefilled(hidden)

    def begin(self) -> list[int]:
        """:meth:`prefill` in parts (a batch prefills several at once): make the cache, return the ids
        to prefill; then :meth:`prefilled` with their hidden states (None for no ids)."""
        self.kv = self.target.runner.new_cache()
        self.proposer.bind_target_cache(self.kv)
        self._start = _now(self.target.device)
        return self.prompt_ids[:-1]

    def prefilled(self, hidden: torch.Tensor | None) -> None:
        if hidden is not None:
            with torch.inference_mode():
                self.proposer.on_prefill(hidden)
        self.stats.prefill_s = _now(self.target.device) - self._start

    def propose(self) -> Step:
        """Draft; the step feeds ``[last token] + draft`` and the rule reads ``step.readout``."""
        return self.propose_together([self])[0]

    @staticmethod
    def propose_together(generations: Sequence[Generation], budgets: Sequence[int | None] | None = None) -> list[Step]:
        """:meth:`propose` of generations whose proposers draft together (one class, equal
        :meth:`Proposer.batch_key`; engine/batch.py groups them): each waited for all the drafting.
        ``budgets``: at most that many draft tokens each (a batch's choice; None: the method's)."""
        first = generations[0]
        budgets = budgets or [None] * len(generations)
        t0 = _now(first.target.device)
        with torch.inference_mode():
            drafts = type(first.proposer).propose_batch(
                [g.proposer for g in generations], [g.sequence for g in generations],
                [g.room() if budget is None else min(g.room(), budget) for g, budget in zip(generations, budgets)])
        elapsed = _now(first.target.device) - t0
        steps = []
        for generation, draft in zip(generations, drafts):
            generation.stats.draft_s += elapsed
            steps.append(Step(draft, [generation.sequence[-1], *draft.tokens], generation.rule.readout(draft)))
        return steps

    def room(self) -> int:
        """Draft tokens the request can still use (its step adds one token of the target's own; none
        where its proposer never drafts)."""
        return self.settings.max_new_tokens - len(self.generated) - 1 if self.proposer.drafts else 0

    def accept(self, step: Step, out: Forward, verify_s: float) -> list[int]:
        """Apply the rule to the verification ``out`` of ``step``; cut the cache; return the new tokens."""
        t2, stats, draft, kv = _now(self.target.device), self.stats, step.draft, self.kv
        with torch.inference_mode():
            verdict = self.rule(draft, out.logits)
            kept = list(verdict.path or range(verdict.accepted + 1))
            if draft.parents is not None:
                keep_path(kv, len(self.sequence) - 1, kept)
            stats.accept_s += _now(self.target.device) - t2
            stats.verify_s += verify_s
            stats.target_forwards += 1
            stats.proposed_tokens += len(draft)
            stats.accepted_lengths.append(verdict.accepted)
            self.proposer.observe(len(draft), verdict.accepted)
            self.proposer.observe_hidden(out.hidden[kept])
            kv.crop(len(self.sequence) + verdict.accepted)
        new = [*(step.fed[i] for i in kept[1:]), verdict.next_token]
        new, self.stop_reason = self.stopper.cut(self.generated, new)
        self.generated.extend(new)
        self.sequence.extend(new)
        if self.stop_reason is not None:
            stats.new_tokens = len(self.generated)
            stats.draft_forwards = self.proposer.stats.forwards
            stats.extra.update(self.proposer.stats.extra)
            stats.total_s = _now(self.target.device) - self._start
        return new

    def _run(self) -> Iterator[list[int]]:
        """The single-request path: a batch of one (see :meth:`prefill`, :meth:`propose`, :meth:`accept`)."""
        if self.kv is None:  # a batch (engine/batch.py) may have started it
            self.prefill()
        runner = self.target.runner
        while self.stop_reason is None:
            step = self.propose()
            t1 = _now(self.target.device)
            with torch.inference_mode():
                out = runner.verify(self.kv, step.fed, step.draft.parents, step.readout)
            yield self.accept(step, out, _now(self.target.device) - t1)

    def new_text(self) -> str:
        """The text decoded since the last call ("" while a trailing partial UTF-8 character waits)."""
        text = self.target.tokenizer.decode(self.generated, skip_special_tokens=True)
        if text.endswith("\ufffd") and self.stop_reason is None:  # hold back a partial character
            return ""
        emitted = self._emitted
        if len(text) <= len(emitted) or not text.startswith(emitted):
            return ""
        self._emitted = text
        return text[len(emitted):]

    def _stepping(self) -> Iterator[list[int]]:
        if self._steps is None:
            self._steps = self._run()
        return self._steps

    def __iter__(self) -> Iterator[str]:
        """Yield newly decoded text as it is generated (needs a tokenizer)."""
        for _ in self._stepping():
            if self.target.tokenizer is not None and (text := self.new_text()):
                yield text

    def result(self) -> GenerationResult:
        for _ in self._stepping():
            pass
        tokenizer = self.target.tokenizer
        text = tokenizer.decode(self.generated, skip_special_tokens=True) if tokenizer is not None else ""
        return GenerationResult(text=text, token_ids=list(self.generated), stats=self.stats, method=self.method,
                                stop_reason=self.stop_reason or "length")
