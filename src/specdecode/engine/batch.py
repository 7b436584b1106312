"""Several generations stepped together: every one proposes, one target forward verifies all,
each rule accepts its own rows (issue 28).

:class:`BatchStepper` keeps the generations in progress; they join (:meth:`BatchStepper.add`) and
leave (finished, or :meth:`BatchStepper.remove` — a client that went away) between steps
(continuous batching). A step is :meth:`Generation.propose` for each — generations whose
proposers share a batch key (the same draft head; the same self-draft skip set) draft together,
one draft forward a level for all of them (:meth:`Proposer.propose_batch`) — then the chains of
all generations that share a target runner verified by one :meth:`TargetRunner.forward_batch`, then
:meth:`Generation.accept` for each — the loop's invariant holds per generation after every step,
as it does alone. A tree draft is verified in a forward of its own (tree attention in a batch is
not built yet). The generations joining are prefilled together (one forward, hidden states only)
before the step that first includes them; with ``prefill_chunk`` a step prefills at most that many
prompt tokens (oldest joiner first, a long prompt over several steps), so a long prompt joining
does not stall the streams already decoding: their step runs after each chunk.

Batch-aware speculation: with ``adaptive_drafts`` a step first gives each request a draft budget —
the draft tokens expected to pay for their rows at the batch's current rate, on the measured cost
of rows (:meth:`BatchStepper._draft_budgets`) — so that a draft not worth verifying is not drafted
either (a head step or a self-draft forward costs as much as the row it would feed); the drafts
are then checked again against the same rule (:meth:`BatchStepper._keep_drafts_that_pay`); with
``max_batch_rows`` a step caps the rows it feeds; when the
generations' ``[last token] + draft`` rows exceed it, the draft tokens least likely to be kept
are cut (by each request's acceptance rate so far; never the last token). On a CPU a batched
forward turns compute-bound after a dozen or so rows (the 262k-row head costs as much per row as
all layers): past that point every row costs the whole batch, and a rejected row costs the other
requests too. See docs/serving.md for the measured cost of rows.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from specdecode.engine.loop import Generation, Step
from specdecode.errors import InvalidSettingError
from specdecode.models.runner import Readout
from specdecode.propose.base import Draft


MAX_DRAFT_BUDGET = 64  # draft tokens a request may be given in one batched step (the tuned row buckets' top)


class BatchStepper:
    def __init__(self, generations: Iterable[Generation] = (), max_batch_rows: int | None = None,
                 adaptive_drafts: bool = False, prefill_chunk: int | None = None) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InvalidSettingError(f"prefill_chunk must be >= 1 prompt tokens, got {prefill_chunk}")
        self.active: list[Generation] = []
        self.max_batch_rows = max_batch_rows
        self.adaptive_drafts = adaptive_drafts
        self.prefill_chunk = prefill_chunk
        self._prefilling: dict[Generation, _Prefill] = {}  # joined, prompt not yet all in the cache
        self.costs = RowCost()
        # generations whose prefill or drafting raised (a bug in a method), taken out of the batch
        # before any shared forward: the others go on; the caller reads and clears this
        self.failed: dict[Generation, Exception] = {}
        for generation in generations:
            self.add(generation)

    def __len__(self) -> int:
        return len(self.active)

    def add(self, generation: Generation) -> None:
        """Join the batch at the next step (prefilled then, if it was not yet)."""
        if generation.stop_reason is None and generation not in self.active:
            self.active.append(generation)

    def remove(self, generation: Generation) -> None:
        """Leave the batch (its cache is left as the last step left it)."""
        if generation in self.active:
            self.active.remove(generation)
        self._prefilling.pop(generation, None)

    def prefill_pending(self) -> list[Generation]:
        """Prefill the generations that joined (all of each prompt, or with ``prefill_chunk`` at most
        that many prompt tokens this step, oldest joiner first); return those whose prefill finished."""
        for generation in [g for g in self.active if g.kv is None]:
            ids = self._guarded(generation, generation.begin)
            if ids is not None:
                self._prefilling[generation] = _Prefill(ids)
        budget = self.prefill_chunk if self.prefill_chunk is not None else sum(
            len(p.ids) for p in self._prefilling.values())
        feeds: dict[Generation, list[int]] = {}
        for generation, pending in self._prefilling.items():
            take = pending.ids[pending.done:pending.done + max(budget, 0)]
            if take:
                feeds[generation] = take
                budget -= len(take)
        by_runner: dict[int, list[Generation]] = {}
        for generation in feeds:
            by_runner.setdefault(id(generation.target.runner), []).append(generation)
        for members in by_runner.values():  # every chunk in one forward (hidden states only)
            runner = members[0].target.runner
            try:
                with torch.inference_mode():
                    outs = runner.forward_batch([g.kv for g in members], [feeds[g] for g in members],
                                                [Readout.hidden_only()] * len(members))
            except Exception as exc:  # noqa: BLE001 - reported to the caller in ``failed``
                for generation in members:
                    self.failed[generation] = exc
                    self.remove(generation)
                continue
            for generation, out in zip(members, outs):
                pending = self._prefilling[generation]
                pending.done += len(feeds[generation])
                pending.hidden.append(out.hidden)
        finished = [g for g, p in self._prefilling.items() if p.done == len(p.ids)]
        for generation in finished:
            hidden = self._prefilling.pop(generation).hidden
            self._guarded(generation, lambda g=generation: g.prefilled(torch.cat(hidden) if hidden else None))
        return finished

    def _guarded(self, generation: Generation, call):  # noqa: ANN001, ANN202
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - reported to the caller in ``failed``
            self.failed[generation] = exc
            self.remove(generation)
            return None

    def step(self) -> dict[Generation, list[int]]:
        """One step of every active generation: the tokens each added. Finished ones leave."""
        self.prefill_pending()
        ready = [g for g in self.active if g not in self._prefilling]
        adaptive = self.adaptive_drafts and len(ready) > 1  # alone, a request drafts as its method says
        steps = self._propose(ready, self._draft_budgets(ready) if adaptive else {})
        if adaptive:
            self._keep_drafts_that_pay(steps)
        self._cap_rows(steps)
        added: dict[Generation, list[int]] = {}
        by_runner: dict[int, list[Generation]] = {}
        for generation, step in steps.items():
            if step.draft.parents is None:
                by_runner.setdefault(id(generation.target.runner), []).append(generation)
            else:  # a tree: its own forward
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = generation.target.runner.verify(generation.kv, step.fed, step.draft.parents, step.readout)
                added[generation] = generation.accept(step, out, time.perf_counter() - t0)
        for members in by_runner.values():
            runner = members[0].target.runner
            t0 = time.perf_counter()
            with torch.inference_mode():
                outs = runner.forward_batch([g.kv for g in members], [steps[g].fed for g in members],
                                            [steps[g].readout for g in members])
            verify_s = time.perf_counter() - t0  # every member waited for the whole forward
            rows = sum(len(steps[g].fed) for g in members)
            self.costs.add(rows, verify_s)
            for generation, out in zip(members, outs):
                extra = generation.stats.extra
                extra["batch_steps"] = extra.get("batch_steps", 0) + 1
                extra["batch_requests_sum"] = extra.get("batch_requests_sum", 0) + len(members)
                extra["batch_rows_sum"] = extra.get("batch_rows_sum", 0) + rows
                added[generation] = generation.accept(steps[generation], out, verify_s)
        self.active = [g for g in self.active if g.stop_reason is None]
        return {g: added[g] for g in steps}

    def _propose(self, generations: list[Generation], budgets: dict[Generation, int]) -> dict[Generation, Step]:
        """Every generation's step (at most ``budgets[g]`` draft tokens where given); those whose
        proposers share a batch key draft together (one draft forward a level for all of them). A
        drafting error takes its group out of the batch."""
        groups: dict[object, list[Generation]] = {}
        for generation in generations:
            key = self._guarded(generation, generation.proposer.batch_key)
            if generation in self.failed:
                continue
            group = id(generation) if key is None else (type(generation.proposer), key)
            groups.setdefault(group, []).append(generation)
        steps: dict[Generation, Step] = {}
        for members in groups.values():
            try:
                steps.update(zip(members, Generation.propose_together(members, [budgets.get(g) for g in members])))
            except Exception as exc:  # noqa: BLE001 - reported to the caller in ``failed``
                for generation in members:
                    self.failed[generation] = exc
                    self.remove(generation)
        return steps

    def run(self) -> None:
        """Step until every generation has finished."""
        while self.active:
            self.step()

    def _draft_budgets(self, generations: list[Generation]) -> dict[Generation, int]:
        """How many draft tokens each request may draft this step (empty until the cost of rows is
        known): the goodput rule of :meth:`_keep_drafts_that_pay` run forwards — starting from one
        row a request (its last token), add the most likely next draft token of any request
        (``α^(j+1)``) while it is worth what its row costs at the step's rate, ``α^(j+1) / b ≥ E / C(rows)``."""
        line = self.costs.line()
        if line is None:
            return {}
        a, b = line
        budgets = dict.fromkeys(generations, 0)
        caps = {g: min(g.room(), MAX_DRAFT_BUDGET) for g in generations}
        rows, expected = len(generations), float(len(generations))
        open_ = [g for g in generations if caps[g] > 0]
        while open_:
            best = max(open_, key=lambda g: _acceptance(g) ** (budgets[g] + 1))
            value = _acceptance(best) ** (budgets[best] + 1)
            if value / b < expected / (a + b * rows):
                break
            budgets[best] += 1
            rows, expected = rows + 1, expected + value
            if budgets[best] >= caps[best]:
                open_.remove(best)
        return budgets

    def _keep_drafts_that_pay(self, steps: dict[Generation, Step]) -> None:
        """Goodput rule (batch-aware speculation): drop the draft token least likely to be kept
        while what it is expected to add (``α^j`` tokens) is worth less than what its row costs at
        the step's current rate — ``α^j / b < E / C(rows)``, with ``C(rows) = a + b·rows`` the
        measured cost of a batched forward and ``E`` the step's expected tokens. In a big batch
        the step already yields many tokens per second, so only likely tokens keep their rows."""
        line = self.costs.line()
        if line is None:
            return
        a, b = line
        chains = {g: s for g, s in steps.items() if s.draft.parents is None}
        rows = sum(len(s.fed) for s in steps.values())
        expected = sum(sum(_acceptance(g) ** j for j in range(len(s.draft) + 1)) for g, s in steps.items())
        while True:
            cuttable = [g for g, s in chains.items() if len(steps[g].draft)]
            if not cuttable:
                return
            worst = min(cuttable, key=lambda g: _acceptance(g) ** len(steps[g].draft))
            value = _acceptance(worst) ** len(steps[worst].draft)
            if value / b >= expected / (a + b * rows):
                return
            steps[worst] = chains[worst] = _shorter(worst, steps[worst])
            rows, expected = rows - 1, expected - value

    def _cap_rows(self, steps: dict[Generation, Step]) -> None:
        """Cut chain drafts until the step feeds at most ``max_batch_rows`` rows: each cut drops the
        draft token least likely to be accepted — the last token of the draft whose ``α^length``
        is smallest, ``α`` being the request's acceptance rate so far (prior 1/2)."""
        if self.max_batch_rows is None:
            return
        total = sum(len(s.fed) for s in steps.values())
        while total > self.max_batch_rows:
            cuttable = [g for g, s in steps.items() if s.draft.parents is None and len(s.draft)]
            if not cuttable:
                return
            worst = min(cuttable, key=lambda g: _acceptance(g) ** len(steps[g].draft))
            steps[worst] = _shorter(worst, steps[worst])
            total -= 1


@dataclass
class _Prefill:
    """A joined generation's prompt ids to prefill, how many are in the cache, their hidden states."""

    ids: list[int]
    done: int = 0
    hidden: list[torch.Tensor] = field(default_factory=list)


class RowCost:
    """The cost of a batched verification forward against the rows it feeds, ``a + b·rows``,
    fitted by least squares to the last ``window`` forwards (None until the rows have varied)."""

    def __init__(self, window: int = 64) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, rows: int, seconds: float) -> None:
        self.samples.append((rows, seconds))

    def line(self) -> tuple[float, float] | None:
        if len(self.samples) < 8:
            return None
        n = len(self.samples)
        mean_r = sum(r for r, _ in self.samples) / n
        mean_t = sum(t for _, t in self.samples) / n
        var = sum((r - mean_r) ** 2 for r, _ in self.samples)
        if var < 1e-9:
            return None
        b = sum((r - mean_r) * (t - mean_t) for r, t in self.samples) / var
        a = mean_t - b * mean_r
        if b <= 0:
            return None
        return max(a, 0.0), b


def _acceptance(generation: Generation) -> float:
    stats = generation.stats
    return (stats.accepted_tokens + 1) / (stats.proposed_tokens + 2)


def _shorter(generation: Generation, step: Step) -> Step:
    """``step`` with its chain draft one token shorter (the rule reads the shorter draft)."""
    draft = step.draft
    keep = len(draft) - 1
    shorter = Draft(draft.tokens[:keep], draft.probs[:keep] if draft.probs is not None else None,
                    draft.log_q[:keep] if draft.log_q is not None else None, None)
    return Step(shorter, step.fed[:keep + 1], generation.rule.readout(shorter))
