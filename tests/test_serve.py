"""`specdecode serve` end to end: a real server process, the real `openai` client, raw httpx for
what a well-behaved client never sends. Generations are short (the real model decodes ~10 tok/s
on a 2-core CPU) so the module stays within a few minutes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from specdecode import SpeculativeDecoder  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.serve]

SRC = Path(__file__).resolve().parents[1] / "src"
PROMPT = "The capital of France is"
CODE_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(*flags: str, startup_s: float = 180.0) -> Iterator[str]:
    """A `specdecode serve` subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "specdecode.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--threads", "1", "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        # a traceback in the server log means a request reached a bug
        assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server("--method", "ar", "--method", "pld", "--max-batch", "4", "--max-queue", "4") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)


def _stats(obj: object) -> dict:
    return (obj.model_extra or {})["speculative_stats"]


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_greedy_completion_equals_the_library(client, real_model, method):
    expected = SpeculativeDecoder(real_model, method).generate(CODE_PROMPT, max_new_tokens=16)
    response = client.completions.create(model="default", prompt=CODE_PROMPT, max_tokens=16, temperature=0,
                                         extra_body={"speculative": {"method": method}})
    choice = response.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == ("stop" if expected.stop_reason == "eos" else "length")
    assert response.usage.prompt_tokens == expected.stats.prompt_tokens
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    stats = _stats(response)
    assert stats["method"] == method and stats["new_tokens"] == len(expected.token_ids)
    assert stats["target_forwards"] == expected.stats.target_forwards
    for key in ("tokens_per_target_forward", "acceptance_rate", "draft_s", "verify_s", "prefill_s", "total_s"):
        assert key in stats
    if method == "pld":
        assert stats["tokens_per_target_forward"] > 1.0 and stats["acceptance_rate"] > 0


def test_prompt_as_token_ids_or_a_one_element_list(client, real_model):
    ids = real_model.tokenizer(PROMPT)["input_ids"]
    texts = {client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0).choices[0].text
             for prompt in (PROMPT, [PROMPT], ids)}
    assert len(texts) == 1


def test_streamed_completion_is_the_same_text_with_stats_on_the_last_chunk(client, real_model):
    expected = SpeculativeDecoder(real_model, "pld", gamma=4).generate(CODE_PROMPT, max_new_tokens=16)
    stream = client.completions.create(model="default", prompt=CODE_PROMPT, max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"speculative": {"method": "pld", "gamma": 4}})
    chunks = list(stream)
    assert all(chunk.object == "text_completion" for chunk in chunks)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected.text and len([t for t in texts if t]) > 1
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing is not chunks[-1]
    assert _stats(finishing[0])["method"] == "pld"
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_chat_uses_the_plain_transcript_and_stops_before_the_next_user_turn(client, real_model):
    # the embedded Gemma is a base model without a chat template: "User: ...\nAssistant:" turns
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    prompt = "System: You answer briefly.\nUser: What is the capital of France?\nAssistant:"
    expected = SpeculativeDecoder(real_model, "ar").generate(prompt, max_new_tokens=16, stop="\nUser:")
    expected_text = expected.text.split("\nUser:")[0]
    response = client.chat.completions.create(model="default", messages=messages, max_tokens=16, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected_text
    assert response.usage.prompt_tokens == expected.stats.prompt_tokens
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and _stats(chunks[-1])["method"] == "ar"


def test_chat_prompt_uses_the_tokenizer_template_when_there_is_one(real_model):
    from specdecode.errors import PromptError
    from specdecode.serve.engine import chat_prompt

    tokenizer = real_model.tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    assert chat_prompt(tokenizer, messages) == (tokenizer("User: Hi\nAssistant:")["input_ids"], ("\nUser:",))
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}"
                               "{{ raise_exception('no system turns') }}{% endif %}<{{ m.role }}>{{ m.content }}"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        ids, stops = chat_prompt(tokenizer, messages)
        assert ids == tokenizer("<user>Hi<assistant>")["input_ids"] and stops == ()  # one BOS, not two
        with pytest.raises(PromptError, match="no system turns"):
            chat_prompt(tokenizer, [{"role": "system", "content": "x"}, *messages])
    finally:
        tokenizer.chat_template = None


def test_stop_string_ends_the_text_before_it_like_openai(client):
    full = client.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = full.split()[2]
    before = full[: full.index(stop)]
    response = client.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert response.choices[0].text == before and response.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == before


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"top_k": 50}).choices[0].text

    assert sample(7) == sample(7)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["default"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server}/metrics").text
    for name in ("specdecode_requests_total", "specdecode_generated_tokens_total",
                 "specdecode_tokens_per_target_forward_bucket", "specdecode_acceptance_rate_bucket",
                 "specdecode_time_to_first_token_seconds_bucket", "specdecode_inter_token_latency_seconds_bucket",
                 "specdecode_queue_depth", "specdecode_kv_budget_tokens", "specdecode_kv_reserved_tokens",
                 "specdecode_kv_used_tokens", *(["process_resident_memory_bytes"] if sys.platform == "linux" else [])):
        assert name in text, name
    assert re.search(r'specdecode_requests_total\{method="ar",route="/v1/completions",status="200"\} [1-9]', text)


def test_the_worker_hands_freed_memory_back_at_most_every_half_minute():
    from specdecode.serve.memory import HeapTrimmer, _glibc_malloc_trim

    if sys.platform == "linux":
        assert _glibc_malloc_trim() is not None and _glibc_malloc_trim()(0) in (0, 1)
    now, calls = [0.0], []
    trimmer = HeapTrimmer(every_s=30.0, clock=lambda: now[0], trim=calls.append)
    trimmer.idle()
    assert calls == []  # nothing decoded since the last trim: nothing to hand back
    for _ in range(10):
        now[0] += 1.0
        trimmer.stepped()
    assert calls == []
    trimmer.idle()
    assert calls == [0]
    for _ in range(40):  # busy for 40 s: one trim after 30
        now[0] += 1.0
        trimmer.stepped()
    assert calls == [0, 0]


GOOD = {"model": "default", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
BAD_INPUT = [
    # (id, body bytes or dict, extra headers, expected status, expected param or None)
    ("malformed-json", b'{"model": "default", "prompt": ', {}, 400, None),
    ("invalid-utf8", b'{"model": "default", "prompt": "\xff\xfe"}', {}, 400, None),
    ("not-an-object", b"[1, 2]", {}, 400, None),
    ("oversized", b'{"prompt": "' + b"a" * (1 << 20) + b'"}', {}, 413, None),
    ("unknown-field", {**GOOD, "frobnicate": 1}, {}, 400, "frobnicate"),
    ("missing-prompt", {"model": "default"}, {}, 400, "prompt"),
    ("negative-max-tokens", {**GOOD, "max_tokens": -5}, {}, 400, "max_tokens"),
    ("huge-max-tokens", {**GOOD, "max_tokens": 10**9}, {}, 400, None),
    ("max-tokens-string", {**GOOD, "max_tokens": "many"}, {}, 400, "max_tokens"),
    ("prompt-over-context", {**GOOD, "prompt": "hello " * 40000}, {}, 400, None),
    ("empty-prompt", {**GOOD, "prompt": "   "}, {}, 400, None),
    ("several-prompts", {**GOOD, "prompt": ["a", "b"]}, {}, 400, "prompt"),
    ("stop-not-a-string", {**GOOD, "stop": [1]}, {}, 400, "stop"),
    ("empty-stop", {**GOOD, "stop": ""}, {}, 400, "stop"),
    ("n-two", {**GOOD, "n": 2}, {}, 400, "n"),
    ("temperature-negative", {**GOOD, "temperature": -1}, {}, 400, "temperature"),
    ("top-p-zero", {**GOOD, "top_p": 0}, {}, 400, "top_p"),
    ("seed-huge", {**GOOD, "seed": 2**70}, {}, 400, "seed"),
    ("presence-penalty", {**GOOD, "presence_penalty": 0.5}, {}, 400, "presence_penalty"),
    ("unknown-model", {**GOOD, "model": "gpt-4"}, {}, 404, "model"),
    ("method-not-served", {**GOOD, "speculative": {"method": "sps"}}, {}, 400, None),
    ("unknown-method-option", {**GOOD, "speculative": {"method": "pld", "gama": 3}}, {}, 400, None),
    ("bad-method-option", {**GOOD, "speculative": {"method": "pld", "gamma": 0}}, {}, 400, None),
    ("path-method-option", {**GOOD, "speculative": {"method": "pld", "profile": "/etc/passwd"}}, {}, 400,
     "speculative"),
    ("huge-method-option", {**GOOD, "speculative": {"method": "pld", "gamma": 10**6}}, {}, 400, "speculative"),
    ("chat-no-messages", {"model": "default", "messages": []}, {}, 400, "messages"),
    ("chat-bad-role", {"model": "default", "messages": [{"role": "robot", "content": "hi"}]}, {}, 400, "messages"),
    ("chat-empty", {"model": "default", "messages": [{"role": "user", "content": " "}]}, {}, 400, None),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, case):
    name, body, headers, status, param = case
    route = "/v1/chat/completions" if name.startswith("chat") else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}{route}", content=content,
                          headers={"content-type": "application/json", **headers}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "\n" not in error["message"]
    assert error["param"] == param
    assert httpx.post(f"{server}/v1/completions", json=GOOD, timeout=60).status_code == 200


@pytest.mark.parametrize("method,path", [("GET", "/v1/nothing"), ("POST", "/v1/engines"), ("GET", "/v1/completions")])
def test_unknown_routes_and_methods_get_openai_errors(server, method, path):
    response = httpx.request(method, f"{server}{path}")
    assert response.status_code in (404, 405)
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert path not in httpx.get(f"{server}/metrics").text or path == "/v1/completions"


def _stream_request(server: str, max_tokens: int, prompt: str = PROMPT, method: str = "ar",
                    disconnect_after: int | None = None, streaming: threading.Event | None = None) -> dict:
    """One raw SSE request; returns its timings and text (or disconnects after a few chunks).

    `streaming`, if given, is set when the first text arrives; `times` holds each text chunk's arrival.
    """
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "speculative": {"method": method}}
    start, first, text, chunks, times = time.perf_counter(), None, "", 0, []
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as response:
        status = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"][0]["text"]:
                first = first or time.perf_counter() - start
                text += chunk["choices"][0]["text"]
                chunks += 1
                times.append(time.perf_counter())
                if streaming is not None:
                    streaming.set()
            if disconnect_after is not None and chunks >= disconnect_after:
                break
    return {"status": status, "ttft": first, "text": text, "end": time.perf_counter(), "times": times}


def test_concurrent_streams_and_a_disconnect_leave_the_server_healthy(server):
    results: list[dict] = []

    def client_thread(index: int) -> None:
        for round_ in range(2):
            leave = 2 if index == 0 and round_ == 0 else None  # one client walks away mid-stream
            results.append(_stream_request(server, 8, method=("ar", "pld")[index % 2], disconnect_after=leave))

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(r["status"] == 200 for r in results)
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    # every slot is free again: a further request starts at once
    assert _stream_request(server, 2)["ttft"] < 5
    metrics = httpx.get(f"{server}/metrics").text
    assert 'specdecode_generations_total{method="ar",outcome="cancelled"} 1.0' in metrics
    assert "specdecode_active_generations 0.0" in metrics


def test_a_short_request_is_not_starved_behind_a_long_one(server):
    results: dict[str, dict] = {}
    streaming = threading.Event()
    long = threading.Thread(target=lambda: results.update(
        long=_stream_request(server, 48, prompt=CODE_PROMPT, streaming=streaming)))
    long.start()
    assert streaming.wait(60)
    results["short"] = _stream_request(server, 4)
    long.join()
    # interleaved step by step: the short one finishes while the long one still has most of its
    # tokens to stream (judged by the long one's own chunks, not by wall-clock margins)
    later = [t for t in results["long"]["times"] if t > results["short"]["end"]]
    assert len(later) >= 10, (len(later), len(results["long"]["times"]))
    assert results["short"]["ttft"] < 2.0


def test_cli_refuses_an_option_no_served_method_takes():
    from specdecode.cli.main import main

    assert main(["serve", "--method", "ar", "--gamma", "3"]) == 2


def test_a_draft_weight_format_that_does_not_exist_is_refused_before_loading():
    from specdecode.errors import InvalidSettingError
    from specdecode.serve.engine import EngineConfig

    with pytest.raises(InvalidSettingError, match="--draft-quantize must be one of auto, none, fp16, int8"):
        EngineConfig(draft="default-draft", methods={"sps": {}}, draft_quantize="bf16").validate()


def test_full_queue_gets_429_and_the_deadline_cuts_a_long_generation():
    with running_server("--max-batch", "1", "--max-queue", "1", "--request-timeout", "3") as url:
        results: list[dict] = []
        threads = [threading.Thread(target=lambda: results.append(_stream_request(url, 400))) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        busy = httpx.post(f"{url}/v1/completions", json=GOOD, timeout=60)
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        for thread in threads:
            thread.join()
        # both were cut at their deadline, the second one while waiting or shortly after it started
        assert [r["status"] for r in results] == [200, 200]
        response = httpx.post(f"{url}/v1/completions", json={**GOOD, "max_tokens": 400}, timeout=60).json()
        assert response["choices"][0]["finish_reason"] == "length"
        assert response["speculative_stats"]["timed_out"] is True
        assert 0 < response["usage"]["completion_tokens"] < 400
        assert httpx.get(f"{url}/health").status_code == 200


def test_batched_requests_equal_the_library_alone_and_the_kv_budget_admits_and_refuses(real_model):
    """Issue 28: concurrent requests are verified in one forward per step; each greedy text equals
    the request decoded alone, also when two other clients walk away mid-batch. A KV budget of 100
    tokens admits about three of these at once (the rest wait, none is refused) and refuses one
    that can never fit."""
    prompts = [PROMPT, CODE_PROMPT, "Once upon a time, in a small village by the sea,", "The weather today"]
    cases = [(p, m) for p in prompts for m in ("pld", "ar")]
    expected = {(p, m): SpeculativeDecoder(real_model, m).generate(p, max_new_tokens=12).text for p, m in cases}
    with running_server("--method", "pld", "--method", "ar", "--max-batch", "8", "--max-kv-tokens", "100") as url:
        got: dict = {}

        def ask(prompt: str, method: str) -> None:
            body = {**GOOD, "prompt": prompt, "max_tokens": 12, "speculative": {"method": method}}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            got[(prompt, method)] = (response.status_code, response.json())

        # two streams admitted first walk away after two chunks, mid-batch: their rows leave the
        # batch and their caches are dropped; no other request's text may change
        leaving = [threading.Thread(target=_stream_request, args=(url, 24),
                                    kwargs=dict(prompt=CODE_PROMPT, method=m, disconnect_after=2))
                   for m in ("pld", "ar")]
        for thread in leaving:
            thread.start()
        time.sleep(0.3)
        threads = [threading.Thread(target=ask, args=case) for case in cases]
        for thread in threads:
            thread.start()
        for thread in [*leaving, *threads]:
            thread.join()
        assert {case: status for case, (status, _) in got.items()} == dict.fromkeys(cases, 200)
        assert {case: body["choices"][0]["text"] for case, (_, body) in got.items()} == expected
        batched = [body["speculative_stats"] for _, body in got.values()]
        assert max(s["extra"]["batch_requests_sum"] / s["extra"]["batch_steps"] for s in batched) > 1.5  # batched
        too_big = httpx.post(f"{url}/v1/completions", json={**GOOD, "max_tokens": 200}, timeout=60)
        assert too_big.status_code == 400 and "KV budget" in too_big.json()["error"]["message"]
        metrics = httpx.get(f"{url}/metrics").text
        assert "specdecode_kv_budget_tokens 100.0" in metrics
        assert "specdecode_kv_reserved_tokens 0.0" in metrics and "specdecode_active_generations 0.0" in metrics
        assert re.search(r'specdecode_generations_total\{method="pld",outcome="cancelled"\} 1\.0', metrics)


def test_the_engine_loads_on_a_thread_that_exits_and_reports_its_errors(monkeypatch):
    """The models load off the main thread (which serves HTTP): a live thread that owns an OpenMP
    pool throttled the worker's every parallel region (a served stream ~1.2x slower); a load error
    still reaches the caller."""
    from specdecode.errors import ModelLoadError
    from specdecode.serve import engine as engine_module

    seen = []

    def failing_load(name, **_):
        seen.append(threading.current_thread())
        raise ModelLoadError(f"no model {name!r}")

    monkeypatch.setattr(engine_module, "load_model", failing_load)
    with pytest.raises(ModelLoadError, match="no model 'nowhere'"):
        engine_module.Engine(engine_module.EngineConfig(model="nowhere"))
    assert len(seen) == 1 and seen[0] is not threading.main_thread() and not seen[0].is_alive()
