"""`transformers`' own ``generate`` as benchmark peers: the numbers our methods must beat.

==================  ==========================================================  =====================
peer                what it runs                                                options (default)
==================  ==========================================================  =====================
``hf``              plain ``generate`` (greedy or sampling)                     —
``hf-pld``          ``generate(prompt_lookup_num_tokens=…)``                    num_tokens (10),
                                                                                max_ngram (2, HF's)
``hf-early-exit``   ``generate(assistant_early_exit=…)``: the target's first    layers (half the
                    ``layers`` layers draft                                     model), num_tokens,
                                                                                schedule, confidence
``hf-assisted``     ``generate(assistant_model=draft)`` (needs ``--draft``)     num_tokens, schedule,
                                                                                confidence
==================  ==========================================================  =====================

``num_tokens`` / ``schedule`` / ``confidence`` map to ``num_assistant_tokens``,
``num_assistant_tokens_schedule`` and ``assistant_confidence_threshold``; left unset they keep
`transformers`' defaults (20, "constant", 0.4). `transformers` reads them from the *assistant's*
generation config, so they are set there for the duration of one call.

Peers get the very same prompt token ids, model object (hence dtype, device and threads; the fast
runtime of ``models/runtime.py`` switched off, so `transformers` runs its own kernels) and
``max_new_tokens`` as our methods. EOS is switched off for the call exactly as ``stop_at_eos=False``
switches it off for ours, so both produce the same number of tokens — and, greedy, the same tokens.
Forward hooks count and time the target's (and draft's) forwards, so peers get the same τ,
acceptance and draft-cost statistics as our methods.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from specdecode.bench.contenders import ContenderSpec, Outcome
from specdecode.engine.stats import GenerationStats
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel, pair_draft
from specdecode.sampling import GenerationSettings, SamplingSettings
from specdecode.timing import clock


def _assistant_settings(num_tokens: int | None, schedule: str | None, confidence: float | None) -> dict[str, Any]:
    if num_tokens is not None and num_tokens < 1:
        raise InvalidSettingError(f"num_tokens must be >= 1, got {num_tokens}")
    schedules = ("constant", "heuristic", "heuristic_transient")
    if schedule is not None and schedule not in schedules:
        raise InvalidSettingError(f"schedule must be one of {', '.join(schedules)}, got {schedule!r}")
    if confidence is not None and not 0 <= confidence < 1:
        raise InvalidSettingError(f"confidence must be in [0, 1), got {confidence}")
    values = dict(num_assistant_tokens=num_tokens, num_assistant_tokens_schedule=schedule,
                  assistant_confidence_threshold=confidence)
    return {key: value for key, value in values.items() if value is not None}


class _PeerSetup:
    """What one peer adds to a plain ``generate`` call."""

    def __init__(self, generate_kwargs: dict[str, Any] | None = None, assistant: LoadedModel | None = None,
                 assistant_config: dict[str, Any] | None = None) -> None:
        self.generate_kwargs = generate_kwargs or {}
        self.assistant = assistant  # None: the target drafts for itself (or nothing drafts)
        self.assistant_config = assistant_config or {}


def _plain(target: LoadedModel, draft: LoadedModel | None) -> _PeerSetup:
    return _PeerSetup()


def _prompt_lookup(target: LoadedModel, draft: LoadedModel | None, num_tokens: int = 10,
                   max_ngram: int = 2) -> _PeerSetup:
    if num_tokens < 1 or max_ngram < 1:
        raise InvalidSettingError(f"hf-pld needs num_tokens >= 1 and max_ngram >= 1, got {num_tokens}, {max_ngram}")
    return _PeerSetup(dict(prompt_lookup_num_tokens=num_tokens, max_matching_ngram_size=max_ngram))


def _early_exit(target: LoadedModel, draft: LoadedModel | None, layers: int | None = None,
                num_tokens: int | None = None, schedule: str | None = None,
                confidence: float | None = None) -> _PeerSetup:
    total = target.config.get_text_config().num_hidden_layers
    layers = total // 2 if layers is None else layers
    if not 1 <= layers < total:
        raise InvalidSettingError(f"hf-early-exit layers must be in [1, {total - 1}], got {layers}")
    return _PeerSetup(dict(assistant_early_exit=layers),
                      assistant_config=_assistant_settings(num_tokens, schedule, confidence))


def _assisted(target: LoadedModel, draft: LoadedModel | None, num_tokens: int | None = None,
              schedule: str | None = None, confidence: float | None = None) -> _PeerSetup:
    if draft is None:
        raise InvalidSettingError("peer 'hf-assisted' needs a draft model (--draft)")
    pair_draft(target, draft)
    return _PeerSetup(assistant=draft, assistant_config=_assistant_settings(num_tokens, schedule, confidence))


_PEERS: dict[str, Callable[..., _PeerSetup]] = {
    "hf": _plain,
    "hf-pld": _prompt_lookup,
    "hf-early-exit": _early_exit,
    "hf-assisted": _assisted,
}


def peer_names() -> list[str]:
    return list(_PEERS)


def peer_options(name: str) -> list[str]:
    return list(inspect.signature(_PEERS[name]).parameters)[2:]


@contextmanager
def _overridden(config: Any, values: dict[str, Any]) -> Iterator[None]:
    """Set attributes of a generation config for one call, then put the old values back."""
    saved = {key: getattr(config, key, None) for key in values}
    try:
        for key, value in values.items():
            setattr(config, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


class _ForwardProbe:
    """Counts and times the forwards ``generate`` makes, telling target from draft forwards.

    From each target forward's cache length ``p`` and input length ``n`` it recovers the per-step
    draft and acceptance counts: the sequence before step ``i`` has ``L_i`` tokens (``L_0`` = the
    prompt, ``L_i = p_i + 1`` after), the step proposed ``p_i + n_i - L_i`` tokens and kept
    ``L_{i+1} - L_i - 1`` of them.
    """

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None) -> None:
        self.target, self.draft = target, draft
        self.full_layers = target.base_model.config.num_hidden_layers
        self.steps: list[tuple[int, int]] = []  # (cache length, input length) per target forward
        self.verify_s = self.draft_s = 0.0
        self.draft_forwards = 0
        self._started = 0.0
        self._device = next(target.parameters()).device

    def _is_draft(self, module: torch.nn.Module) -> bool:
        # early exit drafts with the target itself, its layer count temporarily lowered
        return module is not self.target or module.base_model.config.num_hidden_layers < self.full_layers

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self._is_draft(module):
            cache = kwargs.get("past_key_values")
            ids = kwargs.get("input_ids")
            length = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            self.steps.append((cache.get_seq_length() if cache is not None else 0, length))
        self._started = clock(self._device)

    def _after(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        elapsed = clock(self._device) - self._started
        if self._is_draft(module):
            self.draft_forwards += 1
            self.draft_s += elapsed
        else:
            self.verify_s += elapsed

    @contextmanager
    def attached(self) -> Iterator[_ForwardProbe]:
        handles = []
        for module in {id(m): m for m in (self.target, self.draft) if m is not None}.values():
            handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
            handles.append(module.register_forward_hook(self._after, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def stats(self, prompt_len: int, new_tokens: int) -> GenerationStats:
        lengths = [prompt_len] + [cached + 1 for cached, _ in self.steps[1:]] + [prompt_len + new_tokens]
        proposed = [cached + n - lengths[i] for i, (cached, n) in enumerate(self.steps)]
        return GenerationStats(
            prompt_tokens=prompt_len,
            new_tokens=new_tokens,
            target_forwards=len(self.steps),
            draft_forwards=self.draft_forwards,
            proposed_tokens=sum(proposed),
            accepted_lengths=[lengths[i + 1] - lengths[i] - 1 for i in range(len(self.steps))],
            verify_s=self.verify_s,
            draft_s=self.draft_s,
        )


class HFPeer:
    """One `transformers` ``generate`` configuration. All of them verify with the full target,
    so all are lossless: greedy output must equal ours token for token."""

    peer = True
    lossless = True

    def __init__(self, spec: ContenderSpec, target: LoadedModel, draft: LoadedModel | None,
                 sampling: SamplingSettings) -> None:
        if spec.name not in _PEERS:
            raise InvalidSettingError(f"unknown peer {spec.name!r}; choose one of {', '.join(peer_names())}")
        unknown = sorted(set(spec.options) - set(peer_options(spec.name)))
        if unknown:
            valid = ", ".join(peer_options(spec.name)) or "none"
            raise InvalidSettingError(f"unknown option(s) {', '.join(unknown)} for peer {spec.name!r} (valid: {valid})")
        self.label = spec.label
        self.target = target
        self.setup = _PEERS[spec.name](target, draft, **spec.options)
        self.drafts_with_model = self.setup.assistant is not None or "assistant_early_exit" in self.setup.generate_kwargs

    def _generation_config(self, settings: GenerationSettings) -> Any:
        from transformers import GenerationConfig

        sampling = settings.sampling
        values: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, do_sample=not sampling.greedy)
        if not sampling.greedy:  # explicit, or transformers' default top_k=50 would apply
            values.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        return GenerationConfig(**values, **self.setup.generate_kwargs)

    def run(self, prompt_ids: list[int], settings: GenerationSettings) -> Outcome:
        model = self.target.model
        assistant = self.setup.assistant.model if self.setup.assistant is not None else None
        config = self._generation_config(settings)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.target.device)
        probe = _ForwardProbe(model, assistant)
        with ExitStack() as stack:
            if not settings.stop_at_eos:
                stack.enter_context(_overridden(model.generation_config, dict(eos_token_id=None)))
            drafter = assistant if assistant is not None else model
            stack.enter_context(_overridden(drafter.generation_config, self.setup.assistant_config))
            stack.enter_context(probe.attached())
            if settings.seed is not None:
                torch.manual_seed(settings.seed)  # transformers samples from torch's global generator
            start = clock(self.target.device)
            with torch.inference_mode():
                output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                        generation_config=config, assistant_model=assistant)
            seconds = clock(self.target.device) - start
        tokens = output[0, len(prompt_ids):].tolist()
        stats = probe.stats(len(prompt_ids), len(tokens))
        stats.total_s = seconds
        # only model forwards are visible from outside generate(): n-gram lookup cannot be timed
        return Outcome(tokens, seconds, stats, draft_timed=self.drafts_with_model)
