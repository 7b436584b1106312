"""The library's front door: a decoder that feels like `transformers`' ``generate``."""

from __future__ import annotations

from typing import Any, overload

from specdecode import methods
from specdecode.engine.batch import BatchMemory, BatchStepper
from specdecode.engine.loop import Generation
from specdecode.engine.stats import GenerationResult
from specdecode.errors import InvalidSettingError, PromptError
from specdecode.models.loading import LoadedModel, load_model
from specdecode.sampling import GenerationSettings, SamplingSettings, make_generator


def _as_model(model: LoadedModel | str | None) -> LoadedModel | None:
    return load_model(model) if isinstance(model, str) else model


class SpeculativeDecoder:
    """A target, an optional draft and a method with its options, reusable across requests.

    >>> decoder = SpeculativeDecoder("default", method="pld")      # doctest: +SKIP
    >>> decoder.generate("The capital of France is", max_new_tokens=32).text  # doctest: +SKIP
    """

    def __init__(
        self,
        target: LoadedModel | str,
        method: str = "ar",
        draft: LoadedModel | str | None = None,
        **method_options: Any,
    ) -> None:
        methods.validate_options(method, method_options)
        self.target = _as_model(target)
        self.draft = _as_model(draft)
        self.method = method
        self.method_options = method_options
        self._batch_memory = BatchMemory()  # what generate_batch's steps learn, kept across calls
        # Build once with default sampling so bad options or a mismatched draft fail here, not mid-run.
        self._start(GenerationSettings())

    def _start(self, settings: GenerationSettings) -> tuple[Any, Any]:
        ctx = methods.MethodContext(
            self.target, self.draft, settings.sampling, make_generator(settings.seed, self.target.device)
        )
        return methods.build(self.method, ctx, self.method_options)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids for ``prompt``; refuses empty prompts and ones that leave no room to generate."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("prompt is empty")
            if self.target.tokenizer is None:
                raise PromptError(f"model {self.target.name!r} has no tokenizer: pass token ids")
            ids = list(self.target.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise PromptError("prompt is empty")
            if min(ids) < 0 or max(ids) >= self.target.vocab_size:
                raise PromptError(f"prompt token ids must lie in [0, {self.target.vocab_size})")
        return ids

    def start(self, prompt: str | list[int], **settings: Any) -> Generation:
        """Begin a generation; iterate the returned object to stream text."""
        gen_settings = make_settings(**settings)
        ids = self.encode(prompt)
        limit = self.target.max_context
        if len(ids) + gen_settings.max_new_tokens > limit:
            raise PromptError(
                f"prompt of {len(ids)} tokens + max_new_tokens {gen_settings.max_new_tokens} exceeds "
                f"the model's context of {limit} tokens"
            )
        proposer, rule = self._start(gen_settings)
        return Generation(self.target, ids, proposer, rule, gen_settings, self.method)

    @overload
    def generate(self, prompt: str | list[int], **settings: Any) -> GenerationResult: ...

    @overload
    def generate(self, prompt: list[str] | list[list[int]], **settings: Any) -> list[GenerationResult]: ...

    def generate(self, prompt: str | list[int] | list[str] | list[list[int]],
                 **settings: Any) -> GenerationResult | list[GenerationResult]:
        """One result for one prompt (text or token ids); for a list of prompts, one result per
        prompt, in order, decoded together: each step verifies every request's draft in one target
        forward (``engine/batch.py``), each with its own cache, rule and statistics. Greedy output
        equals each prompt decoded alone."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return self.generate_batch(prompt, **settings)
        return self.start(prompt, **settings).result()

    def generate_batch(self, prompts: list[str] | list[list[int]], max_batch_rows: int | None = None,
                       adaptive_drafts: bool = True, **settings: Any) -> list[GenerationResult]:
        """:meth:`generate` of several prompts in one batch (``max_batch_rows``, ``adaptive_drafts``:
        see :class:`~specdecode.engine.batch.BatchStepper`; the budgets are on by default, as in
        ``specdecode serve``: drafting every token a method would alone costs a batch more than it
        returns, docs/serving.md)."""
        generations = [self.start(p, **settings) for p in prompts]
        BatchStepper(generations, max_batch_rows=max_batch_rows, adaptive_drafts=adaptive_drafts,
                     memory=self._batch_memory).run()
        return [generation.result() for generation in generations]


def make_settings(
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | list[str] | tuple[str, ...] = (),
    stop_at_eos: bool = True,
    **unknown: Any,
) -> GenerationSettings:
    """Validated :class:`GenerationSettings` from `transformers`-style keyword arguments."""
    if unknown:
        raise InvalidSettingError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        sampling=SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p),
        stop_strings=stops,
        seed=seed,
        stop_at_eos=stop_at_eos,
    )


def generate(
    model: LoadedModel | str,
    prompt: str | list[int],
    method: str = "ar",
    draft: LoadedModel | str | None = None,
    method_options: dict[str, Any] | None = None,
    **settings: Any,
) -> GenerationResult:
    """One-call generation: ``generate("default", "Hello", method="pld", max_new_tokens=32)``."""
    decoder = SpeculativeDecoder(model, method, draft, **(method_options or {}))
    return decoder.generate(prompt, **settings)
