"""The OpenAI wire format: request models, response/chunk bodies and error bodies.

Requests are validated strictly (unknown fields are refused) so that a misspelt parameter fails
loudly instead of being silently ignored. A few standard OpenAI fields that do not change what
this server does are accepted when they carry their neutral value (``user``, ``logprobs: null``,
``presence_penalty: 0`` ...); a non-neutral value is refused, since honouring it is not possible.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_REQUEST_OPTION = 64  # per-request integer method options (gamma, beams ...) stay below this


class SpeculativeOptions(BaseModel):
    """The per-request extra field ``speculative``: which served method, and its numeric options.

    Path-valued options (``profile``, ``bundle``) are refused here: a client must not make the
    server read files; set them on the command line instead. Integers are capped at
    ``MAX_REQUEST_OPTION`` so that one request cannot ask for, say, 100000 beams.
    """

    model_config = ConfigDict(extra="allow")

    method: str | None = None

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _numeric_options_only(self) -> SpeculativeOptions:
        for key, value in self.options().items():
            numbers = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) for v in numbers) or (
                    isinstance(value, list) and not all(isinstance(v, int) for v in value)):
                raise ValueError(f"speculative option {key!r} must be a number, a boolean or a list of integers")
            if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_REQUEST_OPTION for v in numbers):
                raise ValueError(f"speculative option {key!r} exceeds {MAX_REQUEST_OPTION} (set larger values "
                                 "on the command line)")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _RequestBase(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default: sampling
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extra: 0 = off
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: SpeculativeOptions | None = None
    # accepted for compatibility, only with their neutral values (see the module docstring)
    user: str | None = None
    logprobs: None | Literal[False] = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_RequestBase):
    """``POST /v1/completions``. ``prompt`` is a string or token ids; a list of several prompts
    is refused (one choice per request on this server). ``max_tokens`` defaults to 16, as OpenAI."""

    prompt: str | list[str] | list[int]
    echo: Literal[False] = False
    best_of: Literal[1] = 1
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"this server takes one prompt per request, got a list of {len(prompt)}")
            return prompt[0]
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_RequestBase):
    """``POST /v1/chat/completions``; ``max_tokens`` (or ``max_completion_tokens``) defaults to 128."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(stop_reason: str) -> str:
    """OpenAI's finish_reason for the library's stop reason: an EOS or a stop string is "stop"."""
    return "stop" if stop_reason in ("eos", "stop_string") else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """Builds the bodies of one response, in the completion or the chat flavour."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, text: str | None, reason: str | None, *, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    def chunk(self, text: str | None = None, reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(kind, [self._choice(text, reason, first=first)])

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": counts}

    def full(self, text: str, reason: str, counts: dict[str, int], stats: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [self._choice(text, reason)])
        return {**body, "usage": counts, "speculative_stats": stats}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse(error_body(message, type_, param, code), status_code=status)
