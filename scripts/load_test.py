"""Bounded load test of a running `specdecode serve` (loopback only), or of Ray Serve replicas.

Phase "load": CLIENTS concurrent streaming clients, REQUESTS requests each, mixed lengths and
methods; reports every status code, p50/p95 time to first token and tokens/s.
Phase "starvation": a short request sent one second after a long one (run it against
``--max-batch 1`` too to see what the step-level interleaving buys).
Phase "concurrency": 1, 4, 16 clients (``--concurrency``) streaming one method at a time
(``--concurrency-methods pld,ar``, taking turns level by level over ``--concurrency-requests``
rounds): aggregate tokens/s, TTFT and inter-token latency p50/p99.
Phase "disconnect": clients that walk away mid-stream, then as many normal requests, which
must all be served (the abandoned generations' slots were freed); the server must stay healthy.
Phase "soak": ``--clients`` clients for ``--soak-seconds``, each sending, at random (seeded),
greedy streams of every method and length (their text must equal the reference text of the
same prompt and length, decoded alone before the soak: nothing lost or mixed up between
requests), streams it abandons after two chunks, and malformed requests (each must get a 4xx);
the server's resident memory is read from ``/metrics`` every 10 s. Fails on any 5xx, any
mismatched text, any malformed request answered 2xx or any transport error.

    specdecode serve --method ar --method pld --threads 1 --port 8000 &
    python scripts/load_test.py --url http://127.0.0.1:8000 --out results/serve-load

With ``--ray-replicas 1,2`` the script deploys on a local Ray itself, runs the load phase for
each replica count (aggregate tokens/s), then kills one of two replicas mid-load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to German: The weather is nice today and we are going to the park. Translation:",
    "Once upon a time, in a small village by the sea,",
]
LENGTHS = [8, 16, 32, 64]
METHODS = ["ar", "pld"]


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, method: str,
                     disconnect_after: int | None = None) -> dict[str, Any]:
    """One streaming completion; its status, time to first token, tokens and duration."""
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "speculative": {"method": method}}
    start, ttft, chunks, stats, times, text = time.perf_counter(), None, 0, None, [], ""
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code, "method": method, "error": response.text[:200]}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": "stream_error", "method": method, "error": chunk["error"]["message"]}
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    text += chunk["choices"][0]["text"]
                    times.append(time.perf_counter() - start)
                    ttft = ttft or times[0]
                    chunks += 1
                stats = chunk.get("speculative_stats", stats)
                if disconnect_after is not None and chunks >= disconnect_after:
                    return {"status": "disconnected", "method": method}
    except httpx.HTTPError as exc:
        return {"status": f"transport:{type(exc).__name__}", "method": method}
    elapsed = time.perf_counter() - start
    tokens = stats["new_tokens"] if stats else 0
    # inter-token latency: the time after the first text over the tokens after the first one (a
    # speculative step streams several tokens in one chunk), and the gaps between chunks
    itl = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 and len(times) > 1 else None
    return {"status": 200, "method": method, "ttft": ttft, "elapsed": elapsed, "tokens": tokens,
            "max_tokens": max_tokens, "tau": stats["tokens_per_target_forward"] if stats else None,
            "itl": itl, "chunk_gaps": [b - a for a, b in zip(times, times[1:])], "text": text}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(results: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    done = [r for r in results if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    ttfts = [r["ttft"] for r in done if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in done)
    per_method = {m: {"requests": len(rs), "mean_tau": statistics.fmean(r["tau"] for r in rs)}
                  for m in sorted({r["method"] for r in done})
                  if (rs := [r for r in done if r["method"] == m and r["tau"]])}
    return {"requests": len(results), "statuses": statuses, "wall_s": round(wall_s, 2),
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
            "tokens": tokens, "aggregate_tokens_per_s": round(tokens / wall_s, 2),
            "per_request_tokens_per_s_p50": percentile([r["tokens"] / r["elapsed"] for r in done], 0.5),
            "ttft_p99_s": percentile(ttfts, 0.99),
            "itl_p50_s": percentile(itls := [r["itl"] for r in done if r.get("itl") is not None], 0.5),
            "itl_p99_s": percentile(itls, 0.99),
            "chunk_gap_p50_s": percentile(gaps := [g for r in done for g in r.get("chunk_gaps", [])], 0.5),
            "chunk_gap_p99_s": percentile(gaps, 0.99),
            "per_method": per_method}


async def load_phase(url: str, clients: int, requests: int, lengths: list[int]) -> dict[str, Any]:
    async def client_task(index: int, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        out = []
        for j in range(requests):
            k = index * requests + j
            # every length meets every method: k runs over lengths first, methods second
            out.append(await stream_one(client, url, PROMPTS[k % len(PROMPTS)], lengths[k % len(lengths)],
                                        METHODS[k // len(lengths) % len(METHODS)]))
        return out

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        batches = await asyncio.gather(*(client_task(i, client) for i in range(clients)))
        return summarise([r for batch in batches for r in batch], time.perf_counter() - start)


async def concurrency_phase(url: str, levels: list[int], methods: list[str], max_tokens: int,
                            rounds: int) -> dict[str, Any]:
    """Throughput against concurrency (issue 28): at each level, that many clients each stream
    greedy completions of ``max_tokens`` tokens with one method, back to back, every prompt sent
    equally often (1 client: every prompt in turn). The methods take turns level by level, in a
    rotated order each of ``rounds`` rounds, so that a host whose speed drifts (±20-40 % between
    runs here) moves every method alike; each (method, level) pools its rounds."""
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    walls: dict[tuple[str, int], float] = {}
    async with httpx.AsyncClient(timeout=600) as client:
        for method in methods:
            await stream_one(client, url, PROMPTS[0], 4, method)  # warm-up
        for round_ in range(rounds):
            for level in levels:
                shift = (round_ + level) % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    per_client = -(-len(PROMPTS) // level)

                    async def client_task(index: int) -> list[dict[str, Any]]:
                        return [await stream_one(client, url, PROMPTS[(index * per_client + j) % len(PROMPTS)],
                                                 max_tokens, method) for j in range(per_client)]

                    start = time.perf_counter()
                    batches = await asyncio.gather(*(client_task(i) for i in range(level)))
                    walls[method, level] = walls.get((method, level), 0.0) + time.perf_counter() - start
                    results.setdefault((method, level), []).extend(r for batch in batches for r in batch)
    out: dict[str, Any] = {}
    for (method, level), pooled in results.items():
        out[f"{method}_c{level}"] = {**summarise(pooled, walls[method, level]),
                                     "load_average_1m": round(os.getloadavg()[0], 2)}
    return out


async def disconnect_phase(url: str, clients: int) -> dict[str, Any]:
    """Half the clients leave after two chunks of a long request; then as many short ones arrive."""
    async with httpx.AsyncClient(timeout=600) as client:
        left = await asyncio.gather(*(stream_one(client, url, PROMPTS[i % 4], 64, METHODS[i % 2], disconnect_after=2)
                                      for i in range(clients)))
        start = time.perf_counter()
        later = await asyncio.gather(*(stream_one(client, url, PROMPTS[i % 4], 8, METHODS[i % 2])
                                       for i in range(clients)))
        summary = summarise(later, time.perf_counter() - start)
        metrics = (await client.get(f"{url}/metrics")).text
    cancelled = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("specdecode_generations_total") and 'outcome="cancelled"' in line)
    return {"disconnected": sum(r["status"] == "disconnected" for r in left), "later_requests": summary,
            "cancelled_generations_counted": cancelled}


async def starvation_phase(url: str, long_tokens: int = 96, short_tokens: int = 8) -> dict[str, Any]:
    """A short request sent one second after a long one: how long until its first token and its end?"""
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        long = asyncio.create_task(stream_one(client, url, PROMPTS[1], long_tokens, "ar"))
        await asyncio.sleep(1.0)
        short = await stream_one(client, url, PROMPTS[0], short_tokens, "ar")
        short_done = time.perf_counter() - start
        long_result = await long
    return {"long_tokens": long_result.get("tokens"), "long_elapsed_s": long_result.get("elapsed"),
            "short_tokens": short.get("tokens"), "short_ttft_s": short.get("ttft"),
            "short_elapsed_s": short.get("elapsed"), "short_done_at_s": short_done}


# malformed requests of the soak: each must get a 4xx with an OpenAI error body, never a 5xx
MALFORMED: list[tuple[str, Any]] = [
    ("negative max_tokens", {"model": "default", "prompt": "x", "max_tokens": -1}),
    ("huge max_tokens", {"model": "default", "prompt": "x", "max_tokens": 10 ** 9}),
    ("unknown model", {"model": "no-such-model", "prompt": "x", "max_tokens": 4}),
    ("unknown method", {"model": "default", "prompt": "x", "max_tokens": 4, "speculative": {"method": "nope"}}),
    ("n = 3", {"model": "default", "prompt": "x", "max_tokens": 4, "n": 3}),
    ("temperature a string", {"model": "default", "prompt": "x", "max_tokens": 4, "temperature": "hot"}),
    ("no prompt", {"model": "default", "max_tokens": 4}),
    ("not JSON", "{this is not json"),
]


async def resident_mb(client: httpx.AsyncClient, url: str) -> float | None:
    """The server's resident memory (MB) from its /metrics (prometheus_client's process collector)."""
    for line in (await client.get(f"{url}/metrics")).text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1]) / 1e6
    return None


async def soak_phase(url: str, clients: int, seconds: float, lengths: list[int], methods: list[str],
                     seed: int = 0) -> dict[str, Any]:
    """See the module docstring: mixed traffic for ``seconds``; every outcome counted, every
    greedy text checked against its reference, memory sampled."""
    import random

    async with httpx.AsyncClient(timeout=600) as client:
        references = {}
        for prompt in PROMPTS:  # decoded alone (one request at a time) before any load
            for length in lengths:
                result = await stream_one(client, url, prompt, length, "ar")
                references[prompt, length] = result.get("text")
        outcomes: list[dict[str, Any]] = []
        memory: list[tuple[float, float]] = []
        start = time.perf_counter()
        deadline = start + seconds

        async def sample_memory() -> None:
            while time.perf_counter() < deadline:
                if (mb := await resident_mb(client, url)) is not None:
                    memory.append((round(time.perf_counter() - start, 1), round(mb, 1)))
                await asyncio.sleep(10)

        async def client_task(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.perf_counter() < deadline:
                roll = rng.random()
                prompt, length, method = rng.choice(PROMPTS), rng.choice(lengths), rng.choice(methods)
                if roll < 0.15:
                    name, body = rng.choice(MALFORMED)
                    try:
                        response = await client.post(f"{url}/v1/completions", json=body) if not isinstance(
                            body, str) else await client.post(f"{url}/v1/completions", content=body,
                                                               headers={"content-type": "application/json"})
                        ok = 400 <= response.status_code < 500 and "error" in response.json()
                        outcomes.append({"kind": "malformed", "case": name, "status": response.status_code, "ok": ok})
                    except (httpx.HTTPError, ValueError) as exc:
                        outcomes.append({"kind": "malformed", "case": name, "status": type(exc).__name__, "ok": False})
                elif roll < 0.30:
                    result = await stream_one(client, url, prompt, max(lengths), method, disconnect_after=2)
                    outcomes.append({"kind": "disconnect", "status": result["status"],
                                     "ok": result["status"] in ("disconnected", 200)})
                else:
                    result = await stream_one(client, url, prompt, length, method)
                    same = result.get("text") == references[prompt, length]
                    outcomes.append({"kind": "stream", "method": method, "status": result["status"],
                                     "ok": result["status"] == 200 and same, "text_matches": same,
                                     "ttft": result.get("ttft"), "tokens": result.get("tokens", 0)})

        await asyncio.gather(sample_memory(), *(client_task(i) for i in range(clients)))
        wall = time.perf_counter() - start
        if (mb := await resident_mb(client, url)) is not None:
            memory.append((round(time.perf_counter() - start, 1), round(mb, 1)))
    counts: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        kind = counts.setdefault(outcome["kind"], {})
        kind[str(outcome["status"])] = kind.get(str(outcome["status"]), 0) + 1
    streams = [o for o in outcomes if o["kind"] == "stream" and o["status"] == 200]
    server_errors = sum(isinstance(o["status"], int) and o["status"] >= 500 for o in outcomes)
    half = [mb for t, mb in memory if t >= seconds / 2]
    return {"seconds": round(wall, 1), "clients": clients, "outcomes": counts,
            "failures": sum(not o["ok"] for o in outcomes), "server_errors_5xx": server_errors,
            "text_mismatches": sum(not o["text_matches"] for o in streams),
            "streams_served": len(streams), "tokens": sum(o["tokens"] for o in streams),
            "aggregate_tokens_per_s": round(sum(o["tokens"] for o in streams) / wall, 2),
            "ttft_p50_s": percentile([o["ttft"] for o in streams if o["ttft"] is not None], 0.5),
            "ttft_p99_s": percentile([o["ttft"] for o in streams if o["ttft"] is not None], 0.99),
            "resident_mb_first": memory[0][1] if memory else None,
            "resident_mb_max": max(mb for _, mb in memory) if memory else None,
            "resident_mb_second_half_range": [min(half), max(half)] if half else None,
            "resident_mb_last": memory[-1][1] if memory else None, "memory_samples": memory}


def health(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=30).status_code


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def run_server_test(args: argparse.Namespace) -> dict[str, Any]:
    lengths = [int(x) for x in args.lengths.split(",")]
    phases = args.phases.split(",")
    result: dict[str, Any] = {}
    if "starvation" in phases:  # first, on an idle server
        result["starvation"] = asyncio.run(starvation_phase(args.url))
    if "load" in phases:
        result["load"] = asyncio.run(load_phase(args.url, args.clients, args.requests, lengths))
    if "concurrency" in phases:
        levels = [int(x) for x in args.concurrency.split(",")]
        result.update(asyncio.run(concurrency_phase(args.url, levels, args.concurrency_methods.split(","),
                                                    args.concurrency_tokens, args.concurrency_requests)))
    if "disconnect" in phases:
        result["disconnect"] = asyncio.run(disconnect_phase(args.url, args.clients // 2))
    if "soak" in phases:
        result["soak"] = asyncio.run(soak_phase(args.url, args.clients, args.soak_seconds, lengths,
                                                args.soak_methods.split(",")))
    result["health_after"] = health(args.url)
    return result


def run_ray_test(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from specdecode.serve.engine import EngineConfig
    from specdecode.serve.ray_app import APP_NAME, deploy_on_ray

    lengths = [int(x) for x in args.lengths.split(",")]
    port = urlparse(args.url).port or 8000
    config = EngineConfig(methods={m: {} for m in METHODS})
    ray.init(num_cpus=2, include_dashboard=False)
    result: dict[str, Any] = {}
    try:
        counts = [int(x) for x in args.ray_replicas.split(",")]
        for replicas in counts:
            deploy_on_ray(config, port=port, replicas=replicas)  # each run redeploys every replica
            asyncio.run(load_phase(args.url, replicas, 1, [4]))  # warm-up: first forwards of each replica
            result[f"replicas_{replicas}"] = asyncio.run(load_phase(args.url, args.clients, args.requests, lengths))
        if counts[-1] != 2:
            deploy_on_ray(config, port=port, replicas=2)
        result["replica_kill"] = asyncio.run(kill_phase(args.url, args.clients, lengths, ray, APP_NAME))
        result["health_after"] = health(args.url)
    finally:
        serve.shutdown()
        ray.shutdown()
    return result


async def kill_phase(url: str, clients: int, lengths: list[int], ray: Any, app_name: str) -> dict[str, Any]:
    """Kill one of two replicas while requests stream; count what the clients saw; wait for Ray
    to bring the replica count back to two."""
    def replica_names() -> list[str]:
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(f"SERVE_REPLICA::{app_name}#"))

    before = replica_names()
    load = asyncio.create_task(load_phase(url, clients, 2, lengths))
    await asyncio.sleep(3)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    killed_at = time.perf_counter()
    summary = await load
    while len(replica_names()) < 2 or before[0] in replica_names():
        if time.perf_counter() - killed_at > 300:
            break
        await asyncio.sleep(1)
    replaced_after = time.perf_counter() - killed_at
    after = await load_phase(url, 2, 1, [8])
    return {"killed": before[0], "during": summary, "replicas_after": replica_names(),
            "replaced_after_s": round(replaced_after, 1), "after_replacement": after}


def markdown(result: dict[str, Any], command: str) -> str:
    lines = ["# specdecode serve load test", "", f"Command: `{command}`", "", f"Machine: {machine()}", "",
             "| phase | requests | statuses | wall s | TTFT p50 s | TTFT p95 s | ITL p50 s | ITL p99 s | tokens "
             "| aggregate tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    def row(name: str, s: dict[str, Any]) -> None:
        lines.append(f"| {name} | {s['requests']} | {s['statuses']} | {s['wall_s']} | {fmt(s['ttft_p50_s'])} | "
                     f"{fmt(s['ttft_p95_s'])} | {fmt(s.get('itl_p50_s'))} | {fmt(s.get('itl_p99_s'))} | {s['tokens']} "
                     f"| {s['aggregate_tokens_per_s']} |")

    soak_lines: list[str] = []
    for key, value in result.items():
        if isinstance(value, dict) and "statuses" in value:
            row(key, value)
        elif key == "disconnect":
            row("after disconnects", value["later_requests"])
        elif key == "soak":
            soak_lines.append(
                f"Soak: {value['clients']} clients for {value['seconds']} s: outcomes {value['outcomes']}; "
                f"{value['failures']} failures, {value['server_errors_5xx']} 5xx, {value['text_mismatches']} "
                f"mismatched texts of {value['streams_served']} streams; {value['aggregate_tokens_per_s']} tok/s; "
                f"resident memory {value['resident_mb_first']} MB first, {value['resident_mb_max']} MB max, "
                f"{value['resident_mb_second_half_range']} MB over the second half, {value['resident_mb_last']} MB last.")
        elif key == "replica_kill":
            row("during replica kill", value["during"])
            row("after replacement", value["after_replacement"])
    lines += ["", *soak_lines, "", "```json", json.dumps(result, indent=2), "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="max_tokens cycled over requests")
    parser.add_argument("--phases", default="starvation,load,disconnect", help="server phases to run")
    parser.add_argument("--concurrency", default="1,4,16", help="phase 'concurrency': client counts")
    parser.add_argument("--concurrency-methods", default="pld,ar", help="phase 'concurrency': the methods, taking turns")
    parser.add_argument("--concurrency-tokens", type=int, default=48, help="phase 'concurrency': max_tokens")
    parser.add_argument("--concurrency-requests", type=int, default=1,
                        help="phase 'concurrency': rounds (each sends every prompt equally often at every level, the "
                             "methods taking turns)")
    parser.add_argument("--soak-seconds", type=float, default=600, help="phase 'soak': how long")
    parser.add_argument("--soak-methods", default=",".join(METHODS), help="phase 'soak': methods the streams use")
    parser.add_argument("--ray-replicas", default=None, help="e.g. 1,2: deploy on a local Ray and compare")
    parser.add_argument("--server-command", default="", help="how the server was started (recorded in COMMAND.txt)")
    parser.add_argument("--out", type=Path, default=None, help="directory for result.json, result.md, COMMAND.txt")
    args = parser.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("loopback only: this script is for local servers")
    command = "python " + shlex.join(sys.argv)
    load_before = os.getloadavg()
    result = run_ray_test(args) if args.ray_replicas else run_server_test(args)
    # the CPU may be shared: record how busy it was, since every number above depends on it
    result["load_average_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "result.md").write_text(markdown(result, command))
        server = f"server: {args.server_command}\n" if args.server_command else ""
        (args.out / "COMMAND.txt").write_text(f"{server}load: {command}\n\nMachine: {machine()}\n")
    bad = [s for phase in result.values() if isinstance(phase, dict)
           for s in phase.get("statuses", {}) if s.startswith("5")]
    return 1 if bad or result.get("health_after") != 200 or result.get("soak", {}).get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
