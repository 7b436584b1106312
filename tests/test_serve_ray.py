"""`specdecode serve --ray`: the same app on Ray Serve.

The short form (one replica; a non-streaming and a streaming request through Ray's proxy) runs
wherever ray is installed; killing a replica needs two and runs with SPECDECODE_HEAVY=1."""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from ray import serve  # noqa: E402
from test_serve import CODE_PROMPT, free_port  # noqa: E402

from specdecode import SpeculativeDecoder  # noqa: E402
from specdecode.serve.engine import EngineConfig  # noqa: E402
from specdecode.serve.ray_app import APP_NAME, deploy_on_ray  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.serve, pytest.mark.ray]
HEAVY = os.environ.get("SPECDECODE_HEAVY") == "1"
REPLICAS = 2 if HEAVY else 1


@pytest.fixture(scope="module")
def ray_url():
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        deploy_on_ray(EngineConfig(methods={"ar": {}, "pld": {}}), port=port, replicas=REPLICAS)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serves_the_same_greedy_text_streamed_or_not(ray_url, real_model):
    expected = SpeculativeDecoder(real_model, "pld").generate(CODE_PROMPT, max_new_tokens=12)
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="x", max_retries=0, timeout=120)
    args = dict(model="default", prompt=CODE_PROMPT, max_tokens=12, temperature=0,
                extra_body={"speculative": {"method": "pld"}})
    response = client.completions.create(**args)
    assert response.choices[0].text == expected.text
    assert response.model_extra["speculative_stats"]["method"] == "pld"
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    bad = httpx.post(f"{ray_url}/v1/completions", json={**args, "extra_body": None}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "extra_body"


@pytest.mark.load
@pytest.mark.skipif(not HEAVY, reason="needs two replicas: set SPECDECODE_HEAVY=1")
def test_killing_a_replica_leaves_the_other_serving_and_ray_replaces_it(ray_url):
    def replicas() -> list[str]:
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#"))

    before = replicas()
    assert len(before) == 2
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    body = {"model": "default", "prompt": CODE_PROMPT, "max_tokens": 4, "temperature": 0}
    statuses = [httpx.post(f"{ray_url}/v1/completions", json=body, timeout=120).status_code for _ in range(6)]
    assert statuses.count(200) >= 5  # a request routed to the dying replica may fail once
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (len(replicas()) < 2 or before[0] in replicas()):
        time.sleep(2)
    assert len(replicas()) == 2 and before[0] not in replicas()
    assert httpx.post(f"{ray_url}/v1/completions", json=body, timeout=120).status_code == 200


def test_a_ray_replica_batches_concurrent_requests(ray_url, real_model):
    """Each replica runs the batching worker: concurrent requests routed to one replica share its
    verification forwards, and each still gets the text it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [CODE_PROMPT, "The capital of France is", "Once upon a time,", "List three rivers:"]
    expected = [SpeculativeDecoder(real_model, "ar").generate(p, max_new_tokens=16).text for p in prompts]

    def ask(prompt: str) -> dict:
        body = {"model": "default", "prompt": prompt, "max_tokens": 16, "temperature": 0,
                "speculative": {"method": "ar"}}
        return httpx.post(f"{ray_url}/v1/completions", json=body, timeout=300).json()

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert [a["choices"][0]["text"] for a in answers] == expected
    extras = [a["speculative_stats"]["extra"] for a in answers]
    assert any(e.get("batch_requests_sum", 0) > e.get("batch_steps", 0) for e in extras), extras
