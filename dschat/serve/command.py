"""`dschat serve`: load the model once and serve it over HTTP until stopped (Ctrl+C, SIGTERM)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import uvicorn

from dschat.settings.config import Settings
from dschat.errors import UsageError
from dschat.cli.flags import add_model_options, command_parser
from dschat.runtime import DEMO_DIR, Options, load_engine, model_name
from dschat.serve import discovery

DESCRIPTION = """\
Serve the model over HTTP on one local engine, for editors and scripts:

  OpenAI:     POST /v1/chat/completions, /v1/completions (with suffix: fill-in-the-middle), GET /v1/models
  llama.cpp:  POST /infill (llama.vim, llama.vscode), /completion, /tokenize, /apply-template, GET /health
  ollama:     POST /api/generate (with suffix: FIM; Continue, Twinny), /api/chat, /api/show, GET /api/tags

  dschat serve --model deepseek-ai/DeepSeek-Coder-V2-Lite-Base       http://127.0.0.1:8012
  dschat serve --host 0.0.0.0 --api-key "$KEY"                        other machines: a key is required

One request runs at a time; the others wait in a queue (--queue; a full queue answers 503 with Retry-After).
Requests share the latent prefix cache: an editor's next keystroke prefills only what changed.

Listening on this machine, it writes a discovery file in the runtime directory ($XDG_RUNTIME_DIR/dschat):
`dschat`, `dschat --plain`, the TUI and `dschat fim` run on this server instead of loading the model
(`--no-server` loads it; `--server URL` names one)."""

EPILOG = "The API key can also come from $DSCHAT_API_KEY (kept out of the process list)."


def parser():
    p = command_parser("serve", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8012, help="port (default 8012, llama.vim's and llama.vscode's)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY (needed to listen beyond this machine)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: its directory's or repo's name)")
    p.add_argument("--queue", type=int, default=8, metavar="N", help="requests that may wait (default 8)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="the longest reply any request may ask for (default 4096)")
    p.add_argument("--max-body", type=int, default=8 * 2**20, metavar="BYTES",
                   help="the largest request body (default 8 MiB)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable; CORS is off by default)")
    add_model_options(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def served_names(given: str | None, model: str) -> list[str]:
    """The name clients use for the model (first), and the other names it answers to."""
    path = Path(model)
    if path.resolve() == DEMO_DIR:
        base = "demo"
    elif path.is_dir():
        base = path.resolve().name
    else:
        base = model  # a hub repo id
    names = [given or base, base, model, model.rsplit("/", 1)[-1]]
    return list(dict.fromkeys(n for n in names if n))


def check(args):
    for flag, value, low in (("--port", args.port, 0), ("--queue", args.queue, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--max-body", args.max_body, 1024)):
        if value < low or (flag == "--port" and value > 65535):
            raise UsageError(f"{flag} {value}: out of range")
    args.api_key = args.api_key or os.environ.get("DSCHAT_API_KEY") or None
    if not is_loopback(args.host) and not args.api_key:
        raise UsageError(f"refusing to listen on {args.host} without an API key: anyone who can reach it could use "
                         "the model (give --api-key KEY or $DSCHAT_API_KEY, or keep --host 127.0.0.1)")


def run_serve(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check(args)
    from dschat.serve.app import build_app
    from dschat.serve.common import Limits, State

    opts = Options.from_args(args, Settings.load())
    opts.model = model_name(opts)
    engine = load_engine(opts)
    state = State(engine, served_names(args.name, opts.model),
                  Limits(max_tokens=args.max_tokens, max_body=args.max_body, queue=args.queue), args.api_key,
                  run_token=discovery.new_token())
    if engine.tokenizer.fim is not None and any(w in state.name.lower() for w in ("instruct", "chat")):
        sys.stderr.write(f"dschat serve: warning: {state.name} looks like an instruct model; DeepSeek's instruct "
                         "models were not trained on fill-in-the-middle (use a -Base checkpoint for editors' FIM)\n")
    app = build_app(state, args.cors_origin)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3, lifespan="off")
    server = Server(config, state, opts.model if is_loopback(args.host) else None)
    try:
        server.run()
    finally:
        state.scheduler.close()
        server.forget()
    if not server.started:
        raise UsageError(f"could not listen on {args.host}:{args.port} (is the port in use?)")
    return 0


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, which says where it listens once it does and, listening on this machine (`model` given:
    its directory), writes the discovery file a local dschat finds it by (discovery.py), removed by `forget`."""

    def __init__(self, config, state, model: str | None):
        super().__init__(config)
        self.state, self.model, self.file = state, model, None

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if not self.started:
            return
        cfg = self.config
        listening = [s for server in self.servers for s in server.sockets]
        port = listening[0].getsockname()[1] if listening else cfg.port
        url = url_of(cfg.host, port)
        if self.model is not None:
            try:
                self.file = discovery.write(url, port, self.state.name, str(self.state.engine.path),
                                            self.state.run_token)
            except OSError as e:
                sys.stderr.write(f"dschat serve: warning: no discovery file ({e}); local dschat runs need "
                                 f"--server {url}\n")
        sys.stderr.write(f"dschat serve: {self.state.name} on {url} (Ctrl+C stops)\n")
        sys.stderr.flush()

    def forget(self):
        if self.file is not None:
            discovery.remove(self.file)
            self.file = None
