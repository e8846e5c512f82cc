"""`subjective serve`: the OpenAI-compatible server on one model."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from subjective.paths import DEFAULT_MODEL
from subjective.server.config import (
    DEFAULT_MAX_BODY_BYTES,
    QUALITY_LEVELS,
    ServerConfig,
    load_pricing,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF-format folder")
    parser.add_argument("--served-model-name", help="name clients use (default: folder name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument(
        "--eager", action="store_true", help="skip torch.compile: loads ~5x faster, runs slower"
    )
    parser.add_argument("--default-quality", choices=QUALITY_LEVELS, default="conservative")
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve requests without an API key (as key 'anonymous'); admin routes still need one",
    )
    parser.add_argument(
        "--public-metrics",
        action="store_true",
        help="serve /metrics without an API key (by default it wants one, as /v1 routes do)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies are refused with 413 before they are read",
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="GPUs to spread the model over (vLLM)"
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        default=os.environ.get("SUBJECTIVE_ADMIN_KEY_FILE") or None,
        help="a secret file whose key is stored as an admin key at start-up "
        "(default: $SUBJECTIVE_ADMIN_KEY_FILE; make one with `subjective keys new-secret`)",
    )
    parser.add_argument(
        "--pricing",
        type=Path,
        help='JSON {"currency", "default", "per_tflop": {model: rate}}; rates per TFLOP as strings',
    )
    parser.set_defaults(handler=serve)


# The exit status once the engine died (sysexits' EX_SOFTWARE), for a supervisor to restart.
ENGINE_DEAD_EXIT_CODE = 70
# After the engine died, how long uvicorn's graceful shutdown waits for open responses before
# cancelling them; the app's teardown (the usage writer draining into the ledger) runs after.
ENGINE_DEAD_DRAIN_S = 5.0


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.main import STARTUP_FAILURE

    from subjective.server.app import create_app

    if not (args.model / "config.json").is_file():
        raise SystemExit(
            f"no model at {args.model}: run `subjective model import-smollm2` (or `make serve`)"
        )
    config = ServerConfig(
        model_dir=args.model,
        served_model_name=args.served_model_name or args.model.name,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        enforce_eager=args.eager,
        default_quality=args.default_quality,
        allow_anonymous=args.allow_anonymous,
        max_body_bytes=args.max_body_bytes,
        public_metrics=args.public_metrics,
        tensor_parallel_size=args.tensor_parallel_size,
        admin_key_file=args.admin_key_file,
        **({"pricing": load_pricing(args.pricing)} if args.pricing else {}),
    )
    engine_died = False

    def stop_for_dead_engine() -> None:
        """The graceful way out, as on SIGTERM: the listener closes, open responses end, then
        the app's lifespan teardown stores every usage record before the process exits."""
        nonlocal engine_died
        engine_died = True
        server.config.timeout_graceful_shutdown = ENGINE_DEAD_DRAIN_S
        server.should_exit = True

    app = create_app(config, on_engine_dead=stop_for_dead_engine)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="info")
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, re-raised once uvicorn stopped
        server.run()
    if engine_died:
        return ENGINE_DEAD_EXIT_CODE
    return 0 if server.started else STARTUP_FAILURE
