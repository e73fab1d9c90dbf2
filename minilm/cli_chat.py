"""The `minilm chat` (interactive terminal chat) and `minilm serve` (OpenAI-compatible HTTP
server) commands. `add_subcommands(subparsers)` adds both to an argparse parser; this module also
runs alone: `python -m minilm.cli_chat chat -m PATH`."""
from __future__ import annotations

import argparse
import sys

from .cli_common import add_model_args, load_model, positive_int

HELP = "commands: /reset clears the conversation, /exit quits (or Ctrl-D); Ctrl-C stops the current answer"


def _common(p):
    add_model_args(p, quant_help="weight format, e.g. f32 (default), int8, int4")


def add_speculative_arg(p):
    p.add_argument("--no-speculative", action="store_true",
                   help="no prompt-lookup speculative decoding (same output, may be slower)")


def add_subcommands(subparsers) -> None:
    """Add `chat` and `serve` to an argparse subparsers object."""
    c = subparsers.add_parser("chat", help="interactive chat in the terminal",
                              description="Chat with a model in the terminal. " + HELP + ".")
    _common(c)
    add_speculative_arg(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-tokens", type=positive_int, default=None,
                   help="longest answer in tokens (default: up to the end of the context)")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(func=cmd_chat)

    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (needs minilm[server])",
                              description="Serve one model over an OpenAI-compatible HTTP API: "
                                          "/v1/chat/completions, /v1/completions, /v1/models, /health.")
    _common(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests")
    s.add_argument("--name", default=None, help="model id reported by /v1/models (default: folder name)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--parallel", type=positive_int, default=None,
                   help="requests generated together, each with its own KV cache (default: what fits in half "
                        "the available memory, at most 8; more wait in a queue)")
    add_speculative_arg(s)
    s.set_defaults(func=cmd_serve)


def _load(args):
    from .errors import MinilmError
    try:
        return load_model(args)
    except (MinilmError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


# ---- chat ------------------------------------------------------------------------------------
def chat_loop(model, system=None, max_tokens=None, temperature=0.7, top_p=1.0, seed=None,
              read=input, out=None, speculative=True) -> int:
    """The interactive loop: read a line, stream the answer, keep the history."""
    from .chat import RequestError, model_id, prepare_chat
    out = out or sys.stdout

    def w(s: str) -> None:
        out.write(s)
        out.flush()

    history: list[dict] = []
    head = [{"role": "system", "content": system}] if system else []
    w(f"minilm chat with {model_id(model)}. {HELP}.\n")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            w("\n")
            return 0
        except KeyboardInterrupt:
            w("\n(use /exit or Ctrl-D to quit)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            history.clear()
            model.reset()
            w("(conversation cleared)\n")
            continue
        if text in ("/help", "/?"):
            w(HELP + "\n")
            continue
        if text.startswith("/") and " " not in text:
            w(f"unknown command {text}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        while True:
            try:
                p = prepare_chat(model, head + history, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, speculative=speculative)
                break
            except RequestError as e:
                if e.code == "context_length_exceeded" and len(history) > 2:
                    del history[:2]           # forget the oldest exchange
                    w("(context full: forgot the oldest exchange)\n")
                    continue
                history.pop()
                w(f"error: {e}\n")
                p = None
                break
        if p is None:
            continue
        answer = ""
        it = iter(p.run())
        try:
            for piece in it:
                answer += piece
                w(piece)
        except KeyboardInterrupt:
            it.close()
            c = model.net.cache
            if c.pos != len(c.tokens):     # interrupted inside a forward pass: start clean
                model.reset()
            w(" [stopped]")
        w("\n")
        history.append({"role": "assistant", "content": answer})


def cmd_chat(args) -> int:
    model = _load(args)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
    from .chat import RequestError
    try:
        return chat_loop(model, args.system, args.max_tokens, args.temperature, args.top_p, args.seed,
                         speculative=not args.no_speculative)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---- serve -----------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: minilm serve needs the server extra: pip install 'minilm[server]'", file=sys.stderr)
        return 2
    from .server import serve
    model = _load(args)
    model.generate_ids([0], max_new_tokens=1)     # compile / load the kernels before the first request
    model.reset()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    print(f"minilm serve: {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    from .errors import MinilmError
    try:
        serve(model, host=args.host, port=args.port, api_key=args.api_key, name=args.name,
              log_level=args.log_level, parallel=args.parallel, speculative=not args.no_speculative)
    except (MinilmError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="minilm")
    sub = ap.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = ap.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
