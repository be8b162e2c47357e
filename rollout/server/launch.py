"""``rollout serve MODEL``: start an engine core and serve it over HTTP (uvicorn, one worker).

Binds 127.0.0.1 by default. Keys come from the flags or, to keep them out of the process list,
from ``ROLLOUT_API_KEY`` / ``ROLLOUT_ADMIN_KEY``. Once the socket listens and the engine is ready it
prints ``rollout serve: listening on http://HOST:PORT`` (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from typing import Any


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(text)  # argparse: "invalid port_number value"
    return port


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` subcommand."""
    s = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible + native + admin routes)")
    s.add_argument("model", help="local HF model directory or preset (tiny, qwen3-0.6b, ...)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, local only)")
    s.add_argument("--port", type=port_number, default=8000, help="port (0: any free one)")
    s.add_argument(
        "--api-key", default=os.environ.get("ROLLOUT_API_KEY"), help="Bearer key of the API routes"
    )
    s.add_argument("--enable-admin", action="store_true", help="mount the /admin control routes")
    s.add_argument("--admin-key", default=os.environ.get("ROLLOUT_ADMIN_KEY"), help="Bearer key of /admin")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    s.add_argument("--max-request-bytes", type=int, default=32 << 20)
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-model-len", type=positive_int, default=None)
    s.add_argument("--num-blocks", type=int, default=None, help="fixed KV cache block count")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--max-num-batched-tokens", type=int, default=8192)
    s.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    s.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    s.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from rollout.server.app import build_app
        from rollout.server.state import ServerConfig
    except ImportError as e:
        print(
            f"rollout serve needs the server extra (pip install 'rollout-engine[server]'): {e}",
            file=sys.stderr,
        )
        return 2
    from rollout import AsyncLLM, CacheConfig, SchedulerConfig
    from rollout.detokenizer import Detokenizer
    from rollout.engine import resolve_device
    from rollout.presets import resolve_model

    resolve_device(args.device)  # a clear error here, not a traceback from the engine process

    config = ServerConfig(
        model_name=args.served_model_name or args.model,
        api_key=args.api_key or None,
        enable_admin=args.enable_admin,
        admin_key=args.admin_key or None,
        max_request_bytes=args.max_request_bytes,
    )
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    # Load the tokenizer here while the engine core starts in its own process (seconds saved).
    path, _ = resolve_model(args.model, args.load_format)
    tokenizer: list[Any] = []
    loader = threading.Thread(target=lambda: tokenizer.append(Detokenizer.from_pretrained(path)), daemon=True)
    loader.start()
    llm = AsyncLLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        seed=args.seed,
        max_model_len=args.max_model_len,
        cache_config=CacheConfig(
            num_blocks=args.num_blocks, gpu_memory_utilization=args.gpu_memory_utilization
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
        ),
    )
    try:
        loader.join()
        detok = tokenizer[0] if tokenizer else None
        if detok is None and llm.info.has_tokenizer:
            raise RuntimeError(f"the tokenizer of {path} did not load")
        app = build_app(llm, config, tokenizer=None if detok is None else detok.tokenizer)
        uv = uvicorn.Config(
            app,
            log_level=args.log_level,
            access_log=args.access_log,
            timeout_graceful_shutdown=5,
            lifespan="on",
        )
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        host, port = sock.getsockname()[:2]
        print(f"rollout serve: listening on http://{host}:{port}", flush=True)
        uvicorn.Server(uv).run(sockets=[sock])
    finally:
        llm.shutdown()
        sock.close()
    return 0
