"""``specdecode serve --ray``: the same FastAPI app on Ray Serve, one engine per replica.

Each replica is a Ray actor that loads its own copy of the model (one torch thread by default,
so replicas do not fight over cores) and runs its own worker thread and scheduler; Ray's proxy
spreads requests over the replicas and restarts a replica that dies. Metrics are per replica
(``/metrics`` answers from whichever replica Ray picks).
"""

from __future__ import annotations

import dataclasses
import os
import time

from fastapi import FastAPI
from ray import serve

from specdecode.serve.app import create_app
from specdecode.serve.engine import Engine, EngineConfig

APP_NAME = "specdecode"


@serve.ingress()
class SpecDecodeReplica:
    """One replica: builds its engine, then (Ray calls the method below) the app that serves it."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = Engine(config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app()
        app.state.engine = self.engine
        return app


def deploy_on_ray(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1) -> None:
    """Start Ray (unless connected already) and Serve, deploy ``replicas`` replicas and return
    once they are healthy. Each replica accepts up to max_batch + max_queue requests; beyond that
    Ray's router queues them."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    config = dataclasses.replace(config, threads=config.threads or 1)
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(
        SpecDecodeReplica,
        name="SpecDecodeReplica",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": config.threads},
        max_ongoing_requests=config.max_batch + config.max_queue,
        health_check_period_s=5,
    )
    serve.run(deployment.bind(config), name=APP_NAME, route_prefix="/")


def serve_on_ray(config: EngineConfig, host: str, port: int, replicas: int) -> int:
    """Deploy, then keep the driver alive until interrupted (Ctrl-C shuts Serve down)."""
    deploy_on_ray(config, host, port, replicas)
    print(f"specdecode on Ray Serve: http://{host}:{port}/v1 ({replicas} replica(s)); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
