"""Command line: ``steerserve serve|prepare|extract|train|calibrate|eval [...]`` (also ``python -m steerserve ...``).

Settings come from ``Settings.from_env`` (``STEERSERVE_*`` variables) with the flags given here on top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from steerserve import __version__

if TYPE_CHECKING:
    from steerserve.config import Settings

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve", description="An inference server for steered generation.")
    parser.add_argument("--version", action="version", version=f"steerserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server",
                                description="Load the model and serve the native, OpenAI-compatible and admin APIs.")
    serve.add_argument("--engine", choices=("auto", "hf", "vllm"), default=None,
                       help="inference engine: vllm (vLLM's AsyncLLM with our worker), hf (transformers), or "
                            "auto = vllm where vLLM is installed, else hf (default: $STEERSERVE_ENGINE or auto)")
    serve.add_argument("--engine-args", type=json.loads, default=None, metavar="JSON",
                       help="extra vLLM engine arguments as a JSON object, e.g. "
                            "'{\"max_num_batched_tokens\": 2048, \"enable_prefix_caching\": false}'")
    serve.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                       help="vLLM tensor-parallel ranks (engine_args tensor_parallel_size); every rank applies "
                            "the same steering tables (default: 1)")
    serve.add_argument("--model", type=Path, default=None, metavar="PATH",
                       help="a local transformers model directory (default: the packaged SmolLM2-135M-Instruct)")
    serve.add_argument("--model-name", default=None, metavar="NAME",
                       help="the name served at /v1/models (default: the model directory's name)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--admin-key", default=None, metavar="KEY",
                       help="enables /admin with 'Authorization: Bearer KEY' (prefer the STEERSERVE_ADMIN_KEY "
                            "variable: a flag is visible in the process list)")
    serve.add_argument("--vectors-dir", type=Path, default=None, metavar="DIR",
                       help="import the <name>.safetensors artifacts in DIR at start-up "
                            "(default: the repository's vectors/ if it exists)")
    serve.add_argument("--no-vectors", action="store_true", help="import no shipped vectors at start-up")
    serve.add_argument("--home", type=Path, default=None, metavar="DIR",
                       help="model cache and artifact store (default: $STEERSERVE_HOME or ~/.cache/steerserve)")
    serve.add_argument("--store-url", default=None, metavar="URL",
                       help="a PostgreSQL artifact manifest that several replicas share, postgresql://USER:PASS@HOST"
                            "/DB (default: $STEERSERVE_STORE_URL, else a SQLite file in the store folder)")
    serve.add_argument("--store-dir", type=Path, default=None, metavar="DIR",
                       help="artifact files (and the SQLite manifest); replicas share one on shared storage "
                            "(default: $STEERSERVE_STORE_DIR or HOME/store)")
    serve.add_argument("--max-coeff", type=float, default=None, metavar="C",
                       help="largest |coeff| a request may use (default: $STEERSERVE_MAX_COEFF or 100)")
    serve.add_argument("--max-interventions", type=int, default=None, metavar="N",
                       help="most interventions per request (default: $STEERSERVE_MAX_INTERVENTIONS or 4)")
    serve.add_argument("--max-batch", type=int, default=None, metavar="N",
                       help="most sequences decoded together (default: $STEERSERVE_MAX_BATCH, else 16 on hf "
                            "and vLLM's max_num_seqs default on vllm)")
    serve.add_argument("--bank-slots", type=int, default=None, metavar="N",
                       help="vector-bank rows per engine; requests wait when their vectors do not fit "
                            "(default: $STEERSERVE_BANK_SLOTS or 4096)")
    serve.add_argument("--request-timeout", default=None, metavar="SECONDS",
                       help="server-side deadline of every request, after which it is cancelled (504 or an error "
                            "event); 'none' for no deadline (default: $STEERSERVE_REQUEST_TIMEOUT or 600)")
    serve.add_argument("--redis-url", default=None, metavar="URL",
                       help="a Redis server, redis://HOST:PORT/DB, that holds the per-key rate limits and the "
                            "in-flight bound for every replica naming it (default: $STEERSERVE_REDIS_URL; "
                            "unset: each process counts alone)")
    serve.add_argument("--unknown-keys", choices=("auto", "reject", "default"), default=None,
                       help="a client key no policy binds: 'auto' serves it under the default policy until a "
                            "first key is ever bound, then refuses it; 'reject' always refuses; 'default' always "
                            "serves it (re-opens a closed deployment) (default: $STEERSERVE_UNKNOWN_KEYS or auto)")
    serve.add_argument("--chat-template", type=Path, default=None, metavar="PATH",
                       help="a Jinja chat template file used instead of the model's own, e.g. one that renders "
                            "'tools' (default: $STEERSERVE_CHAT_TEMPLATE, else the model's)")
    serve.add_argument("--tool-call-parser", default=None, metavar="NAME",
                       help="vLLM's tool-call parser for the model's output format (e.g. hermes, llama3_json, "
                            "mistral); enables tool_choice 'auto' (default: $STEERSERVE_TOOL_CALL_PARSER; unset: "
                            "'auto' is refused)")
    serve.add_argument("--graceful-timeout", type=int, default=30, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, how long in-flight requests may finish (default: 30)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(func=_serve)

    prepare = commands.add_parser("prepare", help="prepare the default model once (no server)",
                                  description="Dequantise the packaged default model into the model cache, "
                                              "so that the first serve starts at once.")
    prepare.add_argument("--home", type=Path, default=None, metavar="DIR",
                         help="cache root; the model goes to $STEERSERVE_MODELS_DIR or DIR/models")
    prepare.set_defaults(func=_prepare)

    from steerserve.evaluation import cli as eval_cli
    from steerserve.tools.calibrate import cli as calibrate
    from steerserve.tools.extract import cli as extract_cli
    from steerserve.tools.sae import cli as sae_cli
    from steerserve.tools.train import cli as train_cli
    from steerserve.tools.vectors import cli as vectors_cli

    extract_cli.add_parser(commands)
    train_cli.add_parser(commands)
    calibrate.add_parser(commands)
    eval_cli.add_parser(commands)
    vectors_cli.add_parser(commands)
    sae_cli.add_parser(commands)
    return parser


def serve_settings(args: argparse.Namespace) -> Settings:
    """The ``Settings`` of ``serve``'s flags on top of the environment; a bad flag is a ``ValueError``."""
    from steerserve.config import Settings, default_vectors_dir, parse_deadline

    if args.engine_args is not None and not isinstance(args.engine_args, dict):
        raise ValueError("--engine-args must be a JSON object")
    engine_args = args.engine_args
    if args.tensor_parallel_size is not None:  # on top of --engine-args: the flag is the more specific
        if args.tensor_parallel_size < 1:
            raise ValueError("--tensor-parallel-size must be at least 1")
        engine_args = {**(engine_args or {}), "tensor_parallel_size": args.tensor_parallel_size}
    vectors_dir = None if args.no_vectors else (args.vectors_dir or default_vectors_dir())
    settings = Settings.from_env(engine=args.engine, model=args.model, model_name=args.model_name,
                             home=args.home, host=args.host, port=args.port, admin_key=args.admin_key,
                             vectors_dir=vectors_dir, max_coeff=args.max_coeff,
                             max_interventions=args.max_interventions, max_batch=args.max_batch,
                             bank_slots=args.bank_slots, engine_args=engine_args, store_url=args.store_url,
                             store_root=args.store_dir, redis_url=args.redis_url, unknown_keys=args.unknown_keys,
                             chat_template=args.chat_template, tool_call_parser=args.tool_call_parser)
    if args.request_timeout is not None:  # 'none' (no deadline) is a None that must still win over the default
        settings = dataclasses.replace(settings, request_timeout=parse_deadline(args.request_timeout))
    if settings.chat_template is not None and not settings.chat_template.is_file():
        raise ValueError(f"--chat-template {settings.chat_template}: no such file")
    if settings.tool_call_parser is not None:  # a wrong name fails now, not at the first request
        from steerserve.api.tool_parsing import check_parser_name

        check_parser_name(settings.tool_call_parser)
    return settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from steerserve.api import create_app
    from steerserve.service import build_service

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = serve_settings(args)
    except ValueError as exc:
        print(f"steerserve: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("steerserve")
    try:
        service = build_service(settings, log.info)
        app = create_app(service, settings)
    except RuntimeError as exc:  # no such engine, no model, a tool-call parser unfit for it: say why, no traceback
        print(f"steerserve: {exc}", file=sys.stderr)
        return 2
    if settings.admin_key is None:
        log.info("admin API disabled (set STEERSERVE_ADMIN_KEY or --admin-key to enable it)")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_timeout, lifespan="on")
    server = uvicorn.Server(config)
    server.run()  # handles SIGINT/SIGTERM: stop accepting, drain, then the lifespan stops the engine
    return 0 if server.started else 1


def _prepare(args: argparse.Namespace) -> int:
    from steerserve.config import Settings
    from steerserve.model import prepare_default_model

    try:
        path = prepare_default_model(Settings.from_env(home=args.home).models_dir)
    except RuntimeError as exc:
        print(f"steerserve: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args) or 0)


if __name__ == "__main__":
    main()
