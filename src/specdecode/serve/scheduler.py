"""One worker thread decodes every request; each step verifies every active request in one
target forward (issue 28: batched speculative decoding).

Why one thread: torch forwards from several threads at once fight over the same CPU cores (and
the same tokenizer), so concurrency comes from batching instead. The worker keeps up to
``max_batch`` generations active in a :class:`~specdecode.engine.batch.BatchStepper`: each step
every active generation drafts, one forward of the target verifies all their drafts (the rows of
every request side by side: each weight is read once per step, not once per request), and each
request's rule accepts its own rows. Requests join and leave between steps (continuous
batching), whatever method they use: every served method shares the target. Joining requests
are prefilled at most ``prefill_chunk`` prompt tokens a step (``--prefill-chunk``, default 256),
so a long prompt is fed over several steps and the streams already decoding keep stepping.

Admission: a request needs ``prompt + max_tokens`` KV tokens; with ``max_kv_tokens`` the active
requests' reservations stay within that budget (one that can never fit is refused, 400); the
others wait in arrival order, and beyond ``max_queue`` waiting requests :meth:`Scheduler.submit`
refuses (the server answers 429). The budget, the reserved and the used tokens are in /metrics.

Every generation keeps its own KV cache; nothing is shared between requests but the model
weights, which are only read.

The handlers talk to the worker through a :class:`Job`: the worker reports :class:`Started`
(or :class:`Failed` when the library refuses the request), then :class:`Text` chunks, then
:class:`Finished`. A handler whose client went away calls :meth:`Job.cancel`; the worker drops
the job before its next step, freeing its slot and its rows in the batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from specdecode.engine.batch import BatchStepper
from specdecode.engine.loop import Generation
from specdecode.errors import PromptError, SpecDecodeError
from specdecode.serve.memory import HeapTrimmer
from specdecode.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class Text:
    text: str


@dataclass
class Finished:
    text: str
    completion_tokens: int
    stop_reason: str  # the library's: eos, stop_string, length; "length" too when cut at the deadline
    stats: dict[str, Any]


@dataclass
class Failed:
    error: Exception


Event = Started | Text | Finished | Failed


class QueueFullError(Exception):
    """Every slot is busy and the waiting queue is full."""


class ShuttingDownError(Exception):
    """The server stopped before the request finished."""


@dataclass(eq=False)
class Job:
    """One request on its way through the worker."""

    method: str
    start: Callable[[], Generation]  # tokenises and builds the method; runs on the worker
    deliver: Callable[[Event], None]  # hands an event to the request's handler (thread-safe)
    timeout_s: float | None = None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    generation: Generation | None = None
    kv_tokens: int = 0  # what it reserves of the KV budget: prompt + max_tokens
    admitted: float | None = None
    last_text_at: float | None = None
    tokens_reported: int = 0
    stops: tuple[str, ...] = ()  # the generation's stop strings: held back from the stream, cut from the text
    pending: str = ""  # text the generation streamed so far
    sent: str = ""  # the part of it delivered

    def cancel(self) -> None:
        """Called by the handler when its client disconnects; the worker drops the job."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.arrived > self.timeout_s

    def releasable(self, text: str) -> str:
        """The part of ``text`` (all text so far) that is safe to send: never a stop string or
        what follows it, and a tail that could be the start of one waits for the next step."""
        cut = cut_at_stop(text, self.stops)
        if len(cut) < len(text):
            return cut
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return text[: len(text) - hold]


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to (without) its earliest stop string, as OpenAI returns it."""
    return text[: min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))]


class Scheduler:
    def __init__(self, metrics: ServerMetrics, max_batch: int = 16, max_queue: int = 16,
                 max_kv_tokens: int | None = None, max_batch_rows: int | None = None,
                 adaptive_drafts: bool = False, prefill_chunk: int | None = None) -> None:
        if max_batch < 1 or max_queue < 0 or (max_kv_tokens is not None and max_kv_tokens < 1):
            raise ValueError("max_batch and max_kv_tokens must be >= 1 and max_queue >= 0")
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_kv_tokens = max_kv_tokens
        self._stepper = BatchStepper(max_batch_rows=max_batch_rows, adaptive_drafts=adaptive_drafts,
                                     prefill_chunk=prefill_chunk)  # the active generations (worker only)
        self._reserved = 0  # KV tokens the active jobs reserve (worker thread only)
        if max_kv_tokens is not None:
            metrics.kv_budget.set(max_kv_tokens)
        self._cond = threading.Condition()
        self._incoming: list[Job] = []  # submitted, not started yet (guarded by _cond)
        self._outstanding = 0  # submitted and not finished (guarded by _cond)
        self._closed = False
        self._waiting: deque[Job] = deque()  # started, waiting for a slot (worker thread only)
        self._active: list[Job] = []  # being decoded (worker thread only)
        self._trimmer = HeapTrimmer()  # hands finished requests' memory back (worker thread only)
        self._thread = threading.Thread(target=self._loop, name="specdecode-worker", daemon=True)
        self._thread.start()

    # --- handler side -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFullError` when ``max_batch + max_queue`` are taken."""
        with self._cond:
            if self._closed:
                raise ShuttingDownError("server is shutting down")
            if self._outstanding >= self.max_batch + self.max_queue:
                raise QueueFullError(f"server busy: {self.max_batch} requests decoding and "
                                     f"{self.max_queue} waiting; retry later")
            self._outstanding += 1
            self._incoming.append(job)
            self._cond.notify()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the worker; requests still in flight get :class:`ShuttingDownError`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # --- worker side --------------------------------------------------------------------------

    def _loop(self) -> None:
        # Each Generation holds torch.inference_mode() across its steps and restores, on finishing,
        # the mode it found: interleaved, the first one to finish would switch it off under the
        # others (their forwards would then record autograd graphs). Holding it here keeps it on.
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._closed or self._incoming or self._waiting or self._active):
                        if not self._cond.wait(timeout=self._trimmer.every_s):
                            self._trimmer.idle()  # idle a while: hand the last requests' memory back
                    if self._closed:
                        break
                    incoming, self._incoming = self._incoming, []
                for job in incoming:
                    self._start(job)
                self._admit()
                if self._active:
                    self._step()
                    self._trimmer.stepped()
                self._update_gauges()
            for job in [*self._incoming, *self._waiting, *self._active]:
                self._release(job, Failed(ShuttingDownError("server is shutting down")), "error")

    def _start(self, job: Job) -> None:
        try:
            job.generation = job.start()
        except Exception as exc:  # the library refused the request (or a bug): tell the client
            self._fail(job, exc)
            return
        job.stops = job.generation.settings.stop_strings
        job.kv_tokens = len(job.generation.prompt_ids) + job.generation.settings.max_new_tokens
        if self.max_kv_tokens is not None and job.kv_tokens > self.max_kv_tokens:
            self._fail(job, PromptError(f"prompt of {len(job.generation.prompt_ids)} tokens + max_tokens "
                                        f"{job.generation.settings.max_new_tokens} exceeds the server's KV budget "
                                        f"of {self.max_kv_tokens} tokens"))
            return
        job.deliver(Started(len(job.generation.prompt_ids)))
        self._waiting.append(job)

    def _admit(self) -> None:
        now = time.perf_counter()
        for job in [j for j in self._waiting if j.cancelled or j.expired(now)]:
            self._waiting.remove(job)
            if job.cancelled:
                self._release(job, None, "cancelled")
            else:
                self._complete(job, timed_out=True)
        # in arrival order: a request that does not fit the KV budget waits, and so do those after it
        while self._waiting and len(self._active) < self.max_batch and self._fits(self._waiting[0]):
            job = self._waiting.popleft()
            job.admitted = now
            self._active.append(job)
            self._reserved += job.kv_tokens
            assert job.generation is not None
            self._stepper.add(job.generation)

    def _fits(self, job: Job) -> bool:
        return self.max_kv_tokens is None or self._reserved + job.kv_tokens <= self.max_kv_tokens

    def _step(self) -> None:
        """One batched step of every active job (after dropping the cancelled and the expired)."""
        now = time.perf_counter()
        for job in list(self._active):
            if job.cancelled:
                self._release(job, None, "cancelled")
            elif job.expired(now):
                self._complete(job, timed_out=True)
        if not self._active:
            return
        try:
            self._stepper.step()
        except Exception as exc:  # a bug in a method must not take the worker down: fail this batch
            for job in list(self._active):
                self._fail(job, exc)
            return
        failed, self._stepper.failed = self._stepper.failed, {}
        for job in list(self._active):
            generation = job.generation
            assert generation is not None
            if generation in failed:
                self._fail(job, failed[generation])
                continue
            chunk = generation.new_text()
            if chunk:
                job.pending += chunk
                self._send_text(job, job.releasable(job.pending))
            if generation.stop_reason is not None:
                self._complete(job, timed_out=False)

    def _send_text(self, job: Job, text: str) -> None:
        """Deliver what ``text`` (all text so far) adds to what was sent."""
        assert job.generation is not None
        if len(text) <= len(job.sent) or not text.startswith(job.sent):
            return
        now, labels = time.perf_counter(), (job.method,)
        produced = len(job.generation.generated)
        if job.last_text_at is None:
            self.metrics.ttft.labels(*labels).observe(now - job.arrived)
        else:
            per_token = (now - job.last_text_at) / max(1, produced - job.tokens_reported)
            self.metrics.itl.labels(*labels).observe(per_token)
        job.last_text_at, job.tokens_reported = now, produced
        job.deliver(Text(text[len(job.sent):]))
        job.sent = text

    def _complete(self, job: Job, timed_out: bool) -> None:
        gen = job.generation
        assert gen is not None
        stats = gen.stats
        if timed_out:  # the generation did not run to its end: count what it produced so far
            elapsed = time.perf_counter() - (job.admitted or job.arrived)
            stats = replace(stats, new_tokens=len(gen.generated), total_s=elapsed if job.admitted else 0.0)
        details = stats.to_dict()
        details.update(method=job.method, timed_out=timed_out,
                       queue_s=(job.admitted or time.perf_counter()) - job.arrived)
        m, labels = self.metrics, (job.method,)
        m.tokens.labels(*labels).inc(len(gen.generated))
        m.prompt_tokens.labels(*labels).inc(len(gen.prompt_ids))
        if stats.target_forwards:
            m.tau.labels(*labels).observe(stats.tokens_per_target_forward)
        if stats.acceptance_rate is not None:
            m.acceptance.labels(*labels).observe(stats.acceptance_rate)
        stop_reason = "length" if timed_out else gen.stop_reason or "length"
        text = gen.target.tokenizer.decode(gen.generated, skip_special_tokens=True)
        if stop_reason == "stop_string":
            text = cut_at_stop(text, job.stops)
        self._send_text(job, text)  # what was held back, or cut at the deadline
        outcome = "timeout" if timed_out else "stop" if stop_reason in ("eos", "stop_string") else "length"
        self._release(job, Finished(text, len(gen.generated), stop_reason, details), outcome)

    def _fail(self, job: Job, exc: Exception) -> None:
        if not isinstance(exc, SpecDecodeError):
            log.exception("generation failed", exc_info=exc)
        self._release(job, Failed(exc), "error")

    def _release(self, job: Job, event: Event | None, outcome: str) -> None:
        """Free the job's slot and drop its generation (and KV cache) here, on the worker."""
        if job in self._active:
            self._active.remove(job)
            self._reserved -= job.kv_tokens
        if job.generation is not None:
            self._stepper.remove(job.generation)  # its rows leave the batch; its cache is dropped
        job.generation = None
        self.metrics.finished.labels(job.method, outcome).inc()
        with self._cond:
            self._outstanding -= 1
        if event is not None:
            job.deliver(event)

    def _update_gauges(self) -> None:
        self.metrics.active.set(len(self._active))
        self.metrics.kv_reserved.set(self._reserved)
        self.metrics.kv_used.set(sum(len(job.generation.kv) for job in self._active
                                     if job.generation is not None and job.generation.kv is not None))
        with self._cond:
            self.metrics.queue_depth.set(self._outstanding - len(self._active))
