"""Serve a checkpoint behind the OpenAI completions API, with continuous batching over the KV cache.

  python scripts/serve.py --checkpoint=out/shakespeare                # http://127.0.0.1:8000/v1
  python scripts/serve.py --checkpoint=HF_DIR --slots=32 --api_key=secret --host=0.0.0.0

Endpoints: POST /v1/completions, POST /v1/chat/completions (a plain "role: content" template),
GET /v1/models, GET /health, and GET / (a playground page; --no_ui turns it off). Any checkpoint
generate.py reads (run folder, ckpt.pt, .safetensors, Hugging Face folder; local or gs://). SIGTERM (or Ctrl-C) finishes the requests in flight, up to
--shutdown_grace seconds, and exits.
"""
import argparse
import logging
import signal
import sys
from typing import Any

from jaxgpt import cli
from jaxgpt.config import ServeConfig, build, make_parser
from jaxgpt.errors import UserError


def main(argv: list[str]) -> int:
    p = make_parser(__doc__, ServeConfig)
    cli.add_plan_flags(p, "compile the engine's decode step at every width and its prefill over the KV cache of --slots "
                          "sequences, print memory per device, and exit (0: fits, 1: does not)")
    cli.add_compile_cache_flag(p)
    args = p.parse_args(argv)
    cli.check_plan_flags(args)
    sc = build(ServeConfig, args)
    if args.compile_only:
        return plan_only(sc, args)
    try:
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serving needs starlette, uvicorn and pydantic; pip install 'jaxgpt[serve]'") from None
    cli.apply_compile_cache(args.compile_cache)
    return serve(sc)


def serve(sc: ServeConfig) -> int:
    """Load the checkpoint, warm the engine up, listen until SIGTERM or Ctrl-C, finish what is in flight."""
    import uvicorn

    from jaxgpt.serve.http import http_config
    from jaxgpt.serve.server import Server

    engine, tokenizer, name, key, limits = _engine(sc)
    app = Server(engine, tokenizer, name, key, limits, ui=not sc.no_ui).app()
    _log_requests()
    config = http_config(app, sc.host, sc.port, sc.max_connections, sc.header_timeout, sc.shutdown_grace)
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown) and then re-raises the signal to the handler
    # that was there before it; a recording handler there makes a requested shutdown a clean exit 0.
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    try:
        uvicorn.Server(config).run()
    finally:
        engine.close()
    if stopped_by:
        print(f"stopped by {signal.Signals(stopped_by[0]).name}", file=sys.stderr, flush=True)
    return 0


def _engine(sc: ServeConfig) -> tuple[Any, Any, str, str | None, Any]:
    """The warmed-up engine, the tokenizer, the model's API name, the API key and the request limits; says
    on stderr what is served (and warns when a network address has no key)."""
    from formats.io import load_any, need_tokenizer
    from jaxgpt import paths
    from jaxgpt.serve.engine import Engine
    from jaxgpt.serve.http import is_loopback
    from jaxgpt.serve.server import Limits, api_key_from

    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    key = api_key_from(sc.api_key)
    if not is_loopback(sc.host) and not key:
        say(f"warning: {sc.host} is reachable from other machines and no API key is set: anyone who can reach it "
            f"can use the model; set --api_key or JAXGPT_API_KEY")
    model, info = load_any(sc.checkpoint, sc.meta, sc.which)
    tokenizer = need_tokenizer(model, info, sc.checkpoint)
    name = sc.model_name or paths.path(sc.checkpoint).name.removesuffix(".safetensors").removesuffix(".pt") or "jaxgpt"
    engine = Engine(model, slots=sc.slots, chunk=sc.chunk, max_queue=sc.max_queue)
    engine.warm_up()
    block = model.config.block_size
    limits = Limits(max_prompt_tokens=sc.max_prompt_tokens or block, max_tokens=sc.max_tokens or block,
                    timeout_s=sc.timeout, body_timeout_s=sc.body_timeout)
    say(f"serving {name} (step {info.get('step')}, {model.config.n_layer} layers, block {block}) on "
        f"http://{sc.host}:{sc.port}/v1 with {sc.slots} slots{', API key required' if key else ''}; "
        f"prompts up to {limits.max_prompt_tokens} tokens, max_tokens up to {limits.max_tokens}")
    if limits.max_prompt_tokens > block:
        say(f"note: prompts longer than {block} tokens are cropped to their last {block} (the model's context)")
    return engine, tokenizer, name, key, limits


def _log_requests() -> None:
    """The server's request log: one timestamped line each, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    served = logging.getLogger("jaxgpt.serve")
    served.addHandler(handler)
    served.setLevel(logging.INFO)
    served.propagate = False


def plan_only(sc: ServeConfig, args: argparse.Namespace) -> int:
    """--compile_only: the engine's programs for --target (or this host), from the checkpoint's config
    and weights' dtype; nothing served."""

    from jaxgpt.plan import targets

    if args.target:  # JAX stays on this host's CPU; the target's compiler is asked for its chips
        targets.compile_here(args.target)
    cli.apply_compile_cache(args.compile_cache)
    from formats.io import load_any
    from jaxgpt.plan.aot import plan_serving
    from jaxgpt.platform import gib

    model, _ = load_any(sc.checkpoint, sc.meta, sc.which)
    report = plan_serving(model, args.target, sc.slots, sc.chunk, cli.progress_lines(args.json))
    return cli.print_plan(report, args.json, f"\nKV cache: {gib(report['kv_cache_bytes'])} for {sc.slots} slots")


if __name__ == "__main__":
    cli.run(main)
