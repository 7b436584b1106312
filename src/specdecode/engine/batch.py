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

Batch-aware speculation: with ``adaptive_drafts`` a step first gives each request a draft budget
(:meth:`BatchStepper._draft_budgets`) — the draft tokens that raise the step's expected tokens per
second, on measured costs: the verification forward ``a + b·rows`` (:class:`LinearCost` over the
last forwards), each drafting group's levels ``a' + d·levels`` (a head step, a self-draft forward:
on a CPU far more than the row it feeds) and the rest of a step. A request's next draft token is
worth its chance to be kept, learnt position by position from the request's rounds and its
drafter's (:class:`Survival`). Drafts are then checked again against the same rule
(:meth:`BatchStepper._keep_drafts_that_pay`), the drafting now paid for; with ``max_batch_rows`` a
step caps the rows it feeds; when the generations' ``[last token] + draft`` rows exceed it, the
draft tokens least likely to be kept are cut (never the last token). On a CPU a batched forward
turns compute-bound after a dozen or so rows: past that point every row costs the whole batch,
and a rejected row costs the other requests too. See docs/serving.md for the measured cost of rows.
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


@dataclass
class BatchMemory:
    """What batched steps learn about their targets on this machine — a verification forward's
    seconds against its rows, each drafter's seconds against its levels, the rest of a step, each
    drafter's pooled keep chances — kept across batches by whoever runs many (the server's one
    stepper, a decoder's ``generate_batch`` calls, a benchmark's waves). A fresh stepper knows no
    costs until eight steps of varied rows, and drafts without budgets until then: a short batch
    (`pld` finishing 64 tokens in ~6 steps) never learnt them (stop 32)."""

    costs: LinearCost = field(default_factory=lambda: LinearCost())
    draft_costs: dict[tuple, LinearCost] = field(default_factory=dict)
    survival: dict[tuple, Survival] = field(default_factory=dict)
    rest_s: float | None = None


class BatchStepper:
    def __init__(self, generations: Iterable[Generation] = (), max_batch_rows: int | None = None,
                 adaptive_drafts: bool = False, prefill_chunk: int | None = None,
                 memory: BatchMemory | None = None) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InvalidSettingError(f"prefill_chunk must be >= 1 prompt tokens, got {prefill_chunk}")
        self.active: list[Generation] = []
        self.max_batch_rows = max_batch_rows
        self.adaptive_drafts = adaptive_drafts
        self.prefill_chunk = prefill_chunk
        self._prefilling: dict[Generation, _Prefill] = {}  # joined, prompt not yet all in the cache
        self.memory = memory if memory is not None else BatchMemory()
        self.costs = self.memory.costs  # a batched verification forward's seconds against its rows
        self.draft_costs = self.memory.draft_costs  # a drafting group's seconds against its levels
        self.survival = self.memory.survival  # each drafter's keep chances, pooled over its requests
        self._survival: dict[Generation, Survival] = {}  # each request's own
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
        self._survival.pop(generation, None)

    def keep_chances(self, generation: Generation, length: int) -> list[float]:
        """The chance that each of a draft's first ``length`` tokens is kept: the product of the
        request's keep rates up to it, each shrunk towards its drafter's pooled rate."""
        own, pool = self._survival.get(generation), self.survival.get(_drafter(generation))
        chances, chance = [], 1.0
        for j in range(length):
            prior = pool.rate(j, *POOL_PRIOR) if pool is not None else POOL_PRIOR[0]
            chance *= own.rate(j, prior, REQUEST_WEIGHT) if own is not None else prior
            chances.append(chance)
        return chances

    def _observe(self, generation: Generation, drafted: int) -> None:
        """Learn how far this step's draft of ``generation`` survived (its request's and its drafter's)."""
        accepted = generation.stats.accepted_lengths[-1]
        self.survival.setdefault(_drafter(generation), Survival(POOL_DECAY)).observe(drafted, accepted)
        self._survival.setdefault(generation, Survival()).observe(drafted, accepted)

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
        started = time.perf_counter()
        ready = [g for g in self.active if g not in self._prefilling]
        adaptive = self.adaptive_drafts and len(ready) > 1  # alone, a request drafts as its method says
        groups = self._drafting_groups(ready)
        steps, drafting_s = self._propose(groups, self._draft_budgets(groups) if adaptive else {})
        if adaptive:
            self._keep_drafts_that_pay(steps, drafting_s)
        self._cap_rows(steps)
        added: dict[Generation, list[int]] = {}
        by_runner: dict[int, list[Generation]] = {}
        verifying_s = 0.0
        for generation, step in steps.items():
            if step.draft.parents is None:
                by_runner.setdefault(id(generation.target.runner), []).append(generation)
            else:  # a tree: its own forward
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = generation.target.runner.verify(generation.kv, step.fed, step.draft.parents, step.readout)
                verifying_s += time.perf_counter() - t0
                added[generation] = generation.accept(step, out, time.perf_counter() - t0)
        for members in by_runner.values():
            runner = members[0].target.runner
            t0 = time.perf_counter()
            with torch.inference_mode():
                outs = runner.forward_batch([g.kv for g in members], [steps[g].fed for g in members],
                                            [steps[g].readout for g in members])
            verify_s = time.perf_counter() - t0  # every member waited for the whole forward
            verifying_s += verify_s
            rows = sum(len(steps[g].fed) for g in members)
            self.costs.add(rows, verify_s)
            for generation, out in zip(members, outs):
                extra = generation.stats.extra
                extra["batch_steps"] = extra.get("batch_steps", 0) + 1
                extra["batch_requests_sum"] = extra.get("batch_requests_sum", 0) + len(members)
                extra["batch_rows_sum"] = extra.get("batch_rows_sum", 0) + rows
                added[generation] = generation.accept(steps[generation], out, verify_s)
                self._observe(generation, len(steps[generation].draft))
        for generation in [g for g in self.active if g.stop_reason is not None]:
            self._survival.pop(generation, None)
        self.active = [g for g in self.active if g.stop_reason is None]
        if steps:  # the rest of a step (acceptance, bookkeeping), smoothed over the last few steps
            rest = time.perf_counter() - started - drafting_s - verifying_s
            memory = self.memory
            memory.rest_s = rest if memory.rest_s is None else 0.8 * memory.rest_s + 0.2 * rest
        return {g: added[g] for g in steps}

    def _drafting_groups(self, generations: list[Generation]) -> dict[tuple, list[Generation]]:
        """The generations by who drafts together: proposers of one class with one batch key share
        each draft forward; any other drafts alone. A group's key is ``(cost key, member)``: the
        drafting cost is learnt under the proposer's class and batch key, alike for every group of
        that drafter; ``member`` tells apart the requests that draft alone (None for a shared group)."""
        groups: dict[tuple, list[Generation]] = {}
        for generation in generations:
            drafter = self._guarded(generation, lambda g=generation: _drafter(g))
            if generation in self.failed:
                continue
            groups.setdefault((drafter, None if drafter[1] is not None else id(generation)), []).append(generation)
        return groups

    def _propose(self, groups: dict[tuple, list[Generation]], budgets: dict[Generation, int]
                 ) -> tuple[dict[Generation, Step], float]:
        """Every generation's step (at most ``budgets[g]`` draft tokens where given), a group's
        members drafting together (one draft forward a level for all of them), and the seconds all
        the drafting took. Each group's drafting time is learnt against the levels it drafted. A
        drafting error takes its group out of the batch."""
        steps: dict[Generation, Step] = {}
        drafting_s = 0.0
        for group, members in groups.items():
            t0 = time.perf_counter()
            try:
                drafted = Generation.propose_together(members, [budgets.get(g) for g in members])
            except Exception as exc:  # noqa: BLE001 - reported to the caller in ``failed``
                for generation in members:
                    self.failed[generation] = exc
                    self.remove(generation)
                continue
            seconds = time.perf_counter() - t0
            drafting_s += seconds
            steps.update(zip(members, drafted))
            levels = max((len(s.draft) for s in drafted if s.draft.parents is None), default=0)
            if levels:
                self.draft_costs.setdefault(group[0], LinearCost()).add(levels, seconds)
        return steps, drafting_s

    def run(self) -> None:
        """Step until every generation has finished."""
        while self.active:
            self.step()

    def _draft_budgets(self, groups: dict[tuple, list[Generation]]) -> dict[Generation, int]:
        """How many draft tokens each request may draft this step (empty until the cost of rows is
        known): the plan of most expected tokens per second. For each drafting group in turn, every
        depth ``D`` it could draft to is tried — its levels' cost paid up front, then draft tokens
        of any request (each worth its chance ``p`` to be kept, :meth:`keep_chances`, up to ``D``)
        taken most likely first while each is worth what its row costs at the plan's rate,
        ``p / b ≥ E / C`` — and the best depth kept. Deeper levels are not tried once no request's next token could pay for its row at the best
        rate so far (a level's cost only lowers the rate further)."""
        line = self.costs.line()
        if line is None:
            return {}
        a, b = line
        fixed = a + (self.memory.rest_s or 0.0)
        room = {g: min(g.room(), MAX_DRAFT_BUDGET) for members in groups.values() for g in members}
        chances = {g: self.keep_chances(g, room[g]) for g in room}
        depth = {group: max(room[g] for g in members) for group, members in groups.items()}
        level_cost = {group: self.draft_costs.get(group[0], LinearCost()).predict for group in groups}

        def plan() -> tuple[dict[Generation, int], float]:
            cost = fixed + b * len(room) + sum(level_cost[k](d) for k, d in depth.items() if d)
            expected = float(len(room))
            budgets = dict.fromkeys(room, 0)
            values = sorted(((chances[g][j], g) for group, members in groups.items() for g in members
                             for j in range(min(room[g], depth[group]))), key=lambda v: -v[0])
            for value, generation in values:
                if value / b < expected / cost:
                    break
                budgets[generation] += 1
                expected, cost = expected + value, cost + b
            return budgets, expected / cost

        for group, members in groups.items():
            deepest, best_depth, best_rate = depth[group], 0, -1.0
            for d in range(deepest + 1):
                depth[group] = d
                rate = plan()[1]
                if rate > best_rate:
                    best_depth, best_rate = d, rate
                if max((chances[g][d] for g in members if room[g] > d), default=0.0) / b < best_rate:
                    break
            depth[group] = best_depth
        return plan()[0]

    def _keep_drafts_that_pay(self, steps: dict[Generation, Step], drafting_s: float) -> None:
        """Goodput rule (batch-aware speculation): drop the draft token least likely to be kept
        while what it is expected to add (its chance ``p`` to be kept) is worth less than what its
        row costs at the step's current rate — ``p / b < E / C``, with ``C = a + b·rows`` the
        measured cost of a batched forward plus this step's drafting (paid already) and the rest of
        a step, and ``E`` the step's expected tokens. In a big batch the step already yields many tokens per
        second, so only likely tokens keep their rows."""
        line = self.costs.line()
        if line is None:
            return
        a, b = line
        chains = {g: s for g, s in steps.items() if s.draft.parents is None}
        rows = sum(len(s.fed) for s in steps.values())
        cost = a + b * rows + drafting_s + (self.memory.rest_s or 0.0)
        chances = {g: self.keep_chances(g, len(s.draft)) for g, s in chains.items()}
        expected = len(steps) + sum(sum(c) for c in chances.values())
        while True:
            cuttable = [g for g, s in chains.items() if len(steps[g].draft)]
            if not cuttable:
                return
            worst = min(cuttable, key=lambda g: chances[g][len(steps[g].draft) - 1])
            value = chances[worst][len(steps[worst].draft) - 1]
            if value / b >= expected / cost:
                return
            steps[worst] = chains[worst] = _shorter(worst, steps[worst])
            cost, expected = cost - b, expected - value

    def _cap_rows(self, steps: dict[Generation, Step]) -> None:
        """Cut chain drafts until the step feeds at most ``max_batch_rows`` rows: each cut drops the
        draft token least likely to be kept (:meth:`keep_chances`; never the last token)."""
        if self.max_batch_rows is None:
            return
        total = sum(len(s.fed) for s in steps.values())
        while total > self.max_batch_rows:
            cuttable = [g for g, s in steps.items() if s.draft.parents is None and len(s.draft)]
            if not cuttable:
                return
            worst = min(cuttable, key=lambda g: self.keep_chances(g, len(steps[g].draft))[-1])
            steps[worst] = _shorter(worst, steps[worst])
            total -= 1


@dataclass
class _Prefill:
    """A joined generation's prompt ids to prefill, how many are in the cache, their hidden states."""

    ids: list[int]
    done: int = 0
    hidden: list[torch.Tensor] = field(default_factory=list)


class LinearCost:
    """Seconds against a count (a batched forward's rows, a drafting group's levels), ``a + b·x``
    fitted by least squares to the last ``window`` samples (None until the counts have varied)."""

    def __init__(self, window: int = 64) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, count: int, seconds: float) -> None:
        self.samples.append((count, seconds))

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

    def predict(self, count: int) -> float:
        """The expected seconds for ``count``: the line where it is known, else in proportion to
        the mean of the samples (0 without any)."""
        line = self.line()
        if line is not None:
            return line[0] + line[1] * count
        if not self.samples:
            return 0.0
        mean_r = sum(r for r, _ in self.samples) / len(self.samples)
        return sum(t for _, t in self.samples) / len(self.samples) / mean_r * count


class Survival:
    """How far drafts survive verification, position by position: of the rounds whose draft reached
    position ``j`` with every token before it kept (``tested[j]``), how many kept it too
    (``kept[j]``). One geometric α cannot say this: a lookup draft (`pld`) that matches is kept
    wholesale, so the chance to keep the next token rises along it, while α read every long draft
    as a poor one (and kept over drafted read a draft of 8 at α = 0.8 as 0.42)."""

    def __init__(self, decay: float = 1.0) -> None:
        self.decay = decay  # each round's weight shrinks by this much a round after it (recent rounds count most)
        self.tested: list[float] = []
        self.kept: list[float] = []

    def observe(self, drafted: int, accepted: int) -> None:
        if self.decay != 1.0:
            self.tested = [t * self.decay for t in self.tested]
            self.kept = [k * self.decay for k in self.kept]
        for j in range(min(drafted, accepted + 1)):
            if j == len(self.tested):
                self.tested.append(0)
                self.kept.append(0)
            self.tested[j] += 1
            self.kept[j] += j < accepted

    def rate(self, j: int, prior: float, weight: float) -> float:
        """The chance to keep position ``j`` once the ones before it were: the counts, with ``weight``
        rounds' worth of ``prior``."""
        tested, kept = (self.tested[j], self.kept[j]) if j < len(self.tested) else (0, 0)
        return (kept + weight * prior) / (tested + weight)


def _drafter(generation: Generation) -> tuple:
    """Who drafts for ``generation``: its proposer's class and batch key (equal for requests whose
    drafts share each draft forward, :meth:`Proposer.batch_key`)."""
    return type(generation.proposer), generation.proposer.batch_key()


POOL_PRIOR = (0.5, 2.0)  # a drafter's keep rate before any round: one kept, one rejected
POOL_DECAY = 0.995  # a drafter's pooled rounds fade with a half-life of ~140 rounds: it follows the traffic
REQUEST_WEIGHT = 4.0  # rounds' worth of its drafter's pooled rate in a request's own estimate


def _shorter(generation: Generation, step: Step) -> Step:
    """``step`` with its chain draft one token shorter (the rule reads the shorter draft)."""
    draft = step.draft
    keep = len(draft) - 1
    shorter = Draft(draft.tokens[:keep], draft.probs[:keep] if draft.probs is not None else None,
                    draft.log_q[:keep] if draft.log_q is not None else None, None)
    return Step(shorter, step.fed[:keep + 1], generation.rule.readout(shorter))
