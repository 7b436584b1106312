"""What a server process (or a Ray replica) holds: the model, one decoder per served method and
the scheduler that runs them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from specdecode import methods
from specdecode.api import SpeculativeDecoder, make_settings
from specdecode.engine.loop import Generation
from specdecode.errors import InvalidSettingError, ModelLoadError, PromptError
from specdecode.models.loading import DRAFT_QUANTIZE, LoadedModel, load_draft, load_model
from specdecode.serve.metrics import ServerMetrics
from specdecode.serve.scheduler import Scheduler

# Models without a chat template get this plain transcript; generation stops before the model
# starts writing the user's next turn.
PLAIN_CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
PLAIN_CHAT_STOP = "\nUser:"


@dataclass
class EngineConfig:
    """Everything needed to build an :class:`Engine`; plain data, so Ray can ship it to replicas."""

    model: str = "default"
    draft: str | None = None
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"ar": {}})  # first = default
    served_name: str | None = None  # the id clients pass as "model" (default: ``model``)
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
    quantize: str | None = None
    draft_quantize: str = "auto"  # the draft's weights (models/loading.py: load_draft)
    fast: bool = True  # the fast CPU runtime (models/runtime.py); False: the model's own kernels
    max_batch: int = 16  # requests decoded at once, verified in one forward per step
    max_queue: int = 16
    max_kv_tokens: int | None = None  # KV budget over the active requests (prompt + max_tokens each)
    max_batch_rows: int | None = None  # cap on the rows one step feeds (drafts cut to fit)
    adaptive_drafts: bool = True  # keep only draft tokens that pay for their rows at the batch's rate
    prefill_chunk: int | None = 256  # prompt tokens prefilled per step (a long prompt does not stall the streams)
    request_timeout: float | None = 600.0

    @property
    def model_id(self) -> str:
        return self.served_name or self.model

    def validate(self) -> None:
        """Refuse bad settings before the (slow) model load."""
        if not self.methods:
            raise InvalidSettingError("serve at least one method")
        for name, options in self.methods.items():
            methods.validate_options(name, options)
        if self.draft_quantize not in DRAFT_QUANTIZE:
            raise InvalidSettingError(f"--draft-quantize must be one of {', '.join(DRAFT_QUANTIZE)}")
        if self.max_batch < 1 or self.max_queue < 0:
            raise InvalidSettingError("--max-batch must be >= 1 and --max-queue >= 0")
        if self.max_kv_tokens is not None and self.max_kv_tokens < 1:
            raise InvalidSettingError("--max-kv-tokens must be >= 1")
        if self.max_batch_rows is not None and self.max_batch_rows < self.max_batch:
            raise InvalidSettingError("--max-batch-rows must be >= --max-batch (one row per request at least)")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise InvalidSettingError("--prefill-chunk must be >= 1")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise InvalidSettingError("--request-timeout must be > 0")


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        _in_a_thread_of_its_own(self._load)
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(self.metrics, config.max_batch, config.max_queue, config.max_kv_tokens,
                                   config.max_batch_rows, config.adaptive_drafts, config.prefill_chunk)

    def _load(self) -> None:
        config = self.config
        load = dict(dtype=config.dtype, device=config.device, threads=config.threads, quantize=config.quantize,
                    fast=config.fast)
        self.target: LoadedModel = load_model(config.model, **load)
        if self.target.tokenizer is None:
            raise ModelLoadError(f"model {config.model!r} has no tokenizer; the server needs one")
        draft_load = {key: value for key, value in load.items() if key != "quantize"}
        self.draft = (load_draft(config.draft, self.target, quantize=config.draft_quantize, **draft_load)
                      if config.draft else None)
        self.decoders = {name: SpeculativeDecoder(self.target, name, self.draft, **options)
                         for name, options in config.methods.items()}

    @property
    def method_names(self) -> list[str]:
        return list(self.decoders)

    def choose_method(self, method: str | None, options: dict[str, Any]) -> str:
        """The served method a request asked for (the first served one by default); checks options."""
        name = method or self.method_names[0]
        if name not in self.decoders:
            raise InvalidSettingError(f"method {name!r} is not served here; choose one of "
                                      f"{', '.join(self.method_names)}")
        methods.validate_options(name, options)
        return name

    def starter(self, method: str, options: dict[str, Any], prompt: str | list[int] | Sequence[dict[str, str]],
                settings: dict[str, Any]) -> Callable[[], Generation]:
        """A function that starts the generation; the scheduler calls it on its worker thread, the
        only thread that touches the model and the tokenizer. ``prompt`` may be chat messages."""
        make_settings(**settings)  # refuse bad settings now, in the handler, before queueing

        def start() -> Generation:
            decoder = self.decoders[method]
            if options:
                decoder = SpeculativeDecoder(self.target, method, self.draft,
                                             **{**self.config.methods[method], **options})
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                ids, stops = chat_prompt(self.target.tokenizer, prompt)
                return decoder.start(ids, **{**settings, "stop": (*settings.get("stop", ()), *stops)})
            return decoder.start(prompt, **settings)

        return start


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], tuple[str, ...]]:
    """Token ids of a chat, and extra stop strings. Uses the tokenizer's chat template when it
    has one; otherwise a plain transcript ("User: ...\\nAssistant: ...") ending in "Assistant:"."""
    if not any(m["content"].strip() for m in messages):
        raise PromptError("messages are empty")
    template = getattr(tokenizer, "chat_template", None)
    if template:
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise PromptError(f"chat template refused the messages: {exc}") from None
        stops: tuple[str, ...] = ()
    else:
        turns = [f"{PLAIN_CHAT_ROLES[m['role']]}: {m['content']}" for m in messages]
        text = "\n".join([*turns, "Assistant:"])
        stops = (PLAIN_CHAT_STOP,)
    # a template writes its own special tokens (BOS ...) into the text
    return list(tokenizer(text, add_special_tokens=not template)["input_ids"]), stops


def _in_a_thread_of_its_own(work: Callable[[], None]) -> None:
    """Run ``work`` (loading the models: kernel tuning, conversions) on a thread that then exits,
    re-raising its error. Why: while one live thread holds an OpenMP thread pool, libgomp throttles
    the spinning of every other thread's pool, so each parallel region of the scheduler's worker
    waited on a futex — measured on a 2-core Zen 4: an empty region 0.7 → 9-21 µs, an RMS norm
    20 → 190 µs, a served `ar` stream ~2x slower than the library's. A thread's pool goes when the
    thread does, so the worker, decoding, is then the only thread that owns one."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(error)

    thread = threading.Thread(target=run, name="specdecode-load")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
