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

from jaxgpt import cli
from jaxgpt.config import CliParser
from jaxgpt.errors import UserError


def main(argv: list[str]) -> int:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, ckpt.pt, .safetensors or Hugging Face folder")
    p.add_argument("--which", choices=["best", "latest"], default="best")
    p.add_argument("--meta", help="nanoGPT meta.pkl for character-level checkpoints")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--chunk", type=int, default=8, help="tokens per compiled decode call between admissions")
    p.add_argument("--max_queue", type=int, default=64,
                   help="sequences (each of a request's n choices and prompts is one) allowed to wait for a slot; a "
                        "request whose sequences do not all fit gets 429 and leaves nothing queued")
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' (default: $JAXGPT_API_KEY, else none)")
    p.add_argument("--model_name", help="the model id the API reports (default: the checkpoint's folder or file name)")
    p.add_argument("--max_tokens", type=int, help="largest max_tokens a request may ask for (default: the model's "
                   "block_size; past it every token recomputes its window)")
    p.add_argument("--max_prompt_tokens", type=int, help="longest prompt in tokens (default: the model's block_size; a "
                   "longer one, if allowed, is cropped to its last block_size tokens, as nanoGPT does)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, streaming included")
    p.add_argument("--max_connections", type=int, default=256, help="open connections at once; more get 503")
    p.add_argument("--header_timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers (idle ones are closed then)")
    p.add_argument("--body_timeout", type=float, default=30.0, help="seconds a request's body may take to arrive")
    p.add_argument("--no_ui", action="store_true", help="no playground page at GET /")
    p.add_argument("--shutdown_grace", type=float, default=10.0, help="seconds SIGTERM waits for requests in flight")
    cli.add_plan_flags(p, "compile the engine's decode step at every width and its prefill over the KV cache of --slots "
                          "sequences, print memory per device, and exit (0: fits, 1: does not)")
    cli.add_compile_cache_flag(p)
    args = p.parse_args(argv)
    cli.check_plan_flags(args)
    for name in ("slots", "chunk", "max_queue", "max_tokens", "max_prompt_tokens", "max_connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("timeout", "header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be > 0 seconds, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in [1, 65535], got {args.port}")
    if args.compile_only:
        return plan_only(args)
    try:
        import pydantic  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serving needs starlette, uvicorn and pydantic; pip install 'jaxgpt[serve]'") from None
    cli.apply_compile_cache(args.compile_cache)
    from formats.io import load_any, need_tokenizer
    from jaxgpt import paths
    from jaxgpt.serve.engine import Engine
    from jaxgpt.serve.http import http_config, is_loopback
    from jaxgpt.serve.server import Limits, Server, api_key_from

    key = api_key_from(args.api_key)
    if not is_loopback(args.host) and not key:
        print(f"warning: {args.host} is reachable from other machines and no API key is set: anyone who can reach it "
              f"can use the model; set --api_key or JAXGPT_API_KEY", file=sys.stderr, flush=True)
    model, info = load_any(args.checkpoint, args.meta, args.which)
    tokenizer = need_tokenizer(model, info, args.checkpoint)
    name = args.model_name or paths.path(args.checkpoint).name.removesuffix(".safetensors").removesuffix(".pt") or "jaxgpt"
    engine = Engine(model, slots=args.slots, chunk=args.chunk, max_queue=args.max_queue)
    engine.warm_up()
    block = model.config.block_size
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens or block, max_tokens=args.max_tokens or block,
                    timeout_s=args.timeout, body_timeout_s=args.body_timeout)
    app = Server(engine, tokenizer, name, key, limits, ui=not args.no_ui).app()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    served = logging.getLogger("jaxgpt.serve")
    served.addHandler(handler)
    served.setLevel(logging.INFO)
    served.propagate = False
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"serving {name} (step {info.get('step')}, {model.config.n_layer} layers, block {block}) on "
        f"http://{args.host}:{args.port}/v1 with {args.slots} slots{', API key required' if key else ''}; "
        f"prompts up to {limits.max_prompt_tokens} tokens, max_tokens up to {limits.max_tokens}")
    if limits.max_prompt_tokens > block:
        say(f"note: prompts longer than {block} tokens are cropped to their last {block} (the model's context)")
    config = http_config(app, args.host, args.port, args.max_connections, args.header_timeout, args.shutdown_grace)
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


def plan_only(args: argparse.Namespace) -> int:
    """--compile_only: the engine's programs for --target (or this host), from the checkpoint's config
    and weights' dtype; nothing served."""

    from jaxgpt.plan import targets

    if args.target:  # JAX stays on this host's CPU; the target's compiler is asked for its chips
        targets.compile_here(args.target)
    cli.apply_compile_cache(args.compile_cache)
    from formats.io import load_any
    from jaxgpt.plan.aot import plan_serving

    model, _ = load_any(args.checkpoint, args.meta, args.which)
    report = plan_serving(model, args.target, args.slots, args.chunk, cli.progress_lines(args.json))
    return cli.print_plan(report, args.json, f"\nKV cache: {report['kv_cache_bytes'] / 2**20:.1f} MiB for {args.slots} slots")


if __name__ == "__main__":
    cli.run(main)
