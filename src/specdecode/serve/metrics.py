"""Prometheus metrics of one server (one registry per app, so each Ray replica and each test
server counts on its own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds (Linux)
        self.requests = Counter("specdecode_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.finished = Counter("specdecode_generations", "Generations by method and outcome "
                                "(stop, length, timeout, cancelled, error)", ["method", "outcome"], registry=r)
        self.tokens = Counter("specdecode_generated_tokens", "Tokens generated", ["method"], registry=r)
        self.prompt_tokens = Counter("specdecode_prompt_tokens", "Prompt tokens processed", ["method"], registry=r)
        self.tau = Histogram("specdecode_tokens_per_target_forward", "tau per finished generation",
                             ["method"], buckets=(1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0),
                             registry=r)
        self.acceptance = Histogram("specdecode_acceptance_rate", "Draft acceptance rate per finished "
                                    "generation (methods that draft)", ["method"],
                                    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.ttft = Histogram("specdecode_time_to_first_token_seconds", "From request arrival to its first "
                              "text (queueing and prefill included)", ["method"], buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("specdecode_inter_token_latency_seconds", "Time between a request's text "
                             "chunks divided by the tokens in the chunk", ["method"], buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.queue_depth = Gauge("specdecode_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("specdecode_active_generations", "Requests being decoded", registry=r)
        self.kv_budget = Gauge("specdecode_kv_budget_tokens", "KV tokens the active requests may reserve "
                               "(--max-kv-tokens; 0: no budget)", registry=r)
        self.kv_reserved = Gauge("specdecode_kv_reserved_tokens", "KV tokens the active requests reserve "
                                 "(prompt + max_tokens each)", registry=r)
        self.kv_used = Gauge("specdecode_kv_used_tokens", "KV tokens the active requests' caches hold", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
