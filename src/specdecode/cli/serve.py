"""``specdecode serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, or Ray Serve).

Method options given on the command line (``--gamma 8``) apply to every served method that
takes them; a request can override numeric options for its own generation.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from specdecode.cli.common import add_method_args, add_model_args, method_kwargs
from specdecode.errors import InvalidSettingError
from specdecode.methods import method_names, method_options

if TYPE_CHECKING:
    from specdecode.serve.engine import EngineConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve an OpenAI-compatible HTTP API",
                                   description="Serve /v1/completions and /v1/chat/completions. "
                                               "See docs/serving.md.")
    parser.add_argument("--method", action="append", choices=method_names(), default=None,
                        help="a method clients may choose (repeatable; the first is the default; default ar)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the id clients pass as 'model' (default: --model)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="requests decoded at once: each step verifies all of them in one forward")
    parser.add_argument("--max-kv-tokens", type=int, default=None,
                        help="KV budget: the active requests' prompt + max_tokens stay within it; the rest wait")
    parser.add_argument("--max-batch-rows", type=int, default=None,
                        help="rows one batched step feeds at most: drafts are cut to fit (default: no cap)")
    parser.add_argument("--adaptive-drafts", action=argparse.BooleanOptionalAction, default=True,
                        help="batch-aware speculation: keep only the draft tokens expected to pay for their rows "
                             "at the batch's measured cost (default on)")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="prompt tokens prefilled per batched step: a long prompt joins over several steps "
                             "instead of stalling the streams already decoding (0: whole prompts)")
    parser.add_argument("--max-queue", type=int, default=16, help="requests waiting for a slot before 429")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds from arrival after which a generation is cut (finish_reason 'length')")
    parser.add_argument("--log-level", default="info")
    ray = parser.add_argument_group("Ray Serve (pip install 'specdecode[ray]')")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of a single uvicorn process")
    ray.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with its own model")
    add_model_args(parser)
    add_method_args(parser)
    parser.set_defaults(run=run)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings from the flags; each method gets the options it takes."""
    from specdecode.serve.engine import EngineConfig

    given = method_kwargs(args)
    served = {name: {k: v for k, v in given.items() if k in method_options(name)}
              for name in dict.fromkeys(args.method or ["ar"])}
    unused = set(given) - {key for options in served.values() for key in options}
    if unused:
        raise InvalidSettingError(f"option(s) {', '.join(sorted(unused))} not taken by any served method")
    config = EngineConfig(model=args.model, draft=args.draft, methods=served, served_name=args.served_model_name,
                          dtype=args.dtype, device=args.device, threads=args.threads, quantize=args.quantize,
                          draft_quantize=args.draft_quantize,
                          fast=not args.eager, max_batch=args.max_batch, max_kv_tokens=args.max_kv_tokens,
                          max_batch_rows=args.max_batch_rows, adaptive_drafts=args.adaptive_drafts,
                          prefill_chunk=args.prefill_chunk or None,
                          max_queue=args.max_queue, request_timeout=args.request_timeout)
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    config = engine_config(args)  # refuse bad flags before loading anything
    try:
        import fastapi  # noqa: F401
    except ImportError:
        raise InvalidSettingError("serving needs FastAPI: pip install 'specdecode[serve]'") from None
    if args.ray:
        try:
            from specdecode.serve.ray_app import serve_on_ray
        except ImportError:
            raise InvalidSettingError("--ray needs Ray Serve: pip install 'specdecode[ray]'") from None
        return serve_on_ray(config, args.host, args.port, args.replicas)
    import uvicorn

    from specdecode.serve.app import create_app
    from specdecode.serve.engine import Engine

    logging.basicConfig(level=args.log_level.upper())
    app = create_app()
    app.state.engine = Engine(config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
