"""`python -m server` (== `kiln serve`): flags -> settings -> app -> uvicorn.

The model loads on the scheduler's worker thread after the socket is bound (with
--engine-process, in the engine process: server/engine_process.py), so /health answers 503
until it is ready (a load failure is printed and the process exits 1).
SIGTERM / Ctrl-C: uvicorn stops accepting, gives in-flight requests (streams included) up to
--shutdown-timeout seconds; a second before that the scheduler stops, so what is left ends with
an error (503, or an error event and [DONE] on a stream), and the process exits.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import NoReturn

from .settings import ServerSettings, build_parser


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"kiln serve: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket uvicorn serves on (bound as uvicorn binds: SO_REUSEADDR, IPv6 for a ':' host).

    Its protocol is named (IPPROTO_TCP, not 0): asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    connections whose socket says TCP. With it on, the body of each response, written after its headers,
    waited for the client's delayed ACK: ~40 ms on every keep-alive request (the openai SDK's, lm-eval's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = ": another server is listening there; stop it or pick another --port" \
            if e.errno == errno.EADDRINUSE else ""
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}")
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = ServerSettings.from_args(args)
    except ValueError as e:
        _fail(str(e))
    from model.cli import default_model_dir

    if settings.model_dir is not None and not Path(settings.model_dir).is_dir():
        _fail(f"--model {settings.model_dir!r} is not a directory")
    if settings.model_dir is not None and not (Path(settings.model_dir) / "config.json").is_file():
        _fail(f"--model {settings.model_dir!r} has no config.json: not a model directory (a `kiln export` "
              "output or a Hugging Face Llama/GPT-2 directory)")
    # bind first: a port already in use is said at once, not after the model has loaded
    sock = _bind(settings.host, settings.port)
    if settings.model_dir is None and not (default_model_dir() / "config.json").is_file():
        _fail(f"no --model given and the default model is missing at {default_model_dir()}")

    import uvicorn

    from .app import create_app
    from .loading import load_configured_engine, set_threads

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    set_threads(settings)
    app = create_app(functools.partial(load_configured_engine, settings), settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    server = uvicorn.Server(config)
    scheduler = app.state.kiln.scheduler

    def on_load_failure() -> None:
        server.should_exit = True  # read by uvicorn's main loop; it then shuts down cleanly

    scheduler.on_fatal = on_load_failure

    # SIGTERM / Ctrl-C: uvicorn stops accepting and waits up to --shutdown-timeout for in-flight requests.
    # A second before that deadline the scheduler stops: what is still running ends with an error (a 503,
    # or an error event and [DONE] on a stream) instead of being cut off mid-response.
    uvicorn_exit = server.handle_exit
    drain: list[threading.Timer] = []

    def handle_exit(sig: int, frame) -> None:
        uvicorn_exit(sig, frame)
        if not drain:
            drain.append(threading.Timer(max(0.0, settings.shutdown_timeout_s - 1.0), scheduler.stop))
            drain[0].daemon = True
            drain[0].start()

    server.handle_exit = handle_exit
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal with the
    # handlers it found installed: these make that last step a clean exit instead of a kill or a traceback
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    server.run(sockets=[sock])
    if getattr(scheduler, "loading", False):
        # stopped during the model's load: nothing ran yet, and letting the interpreter finalize under the
        # loading thread (torch C++ at work) aborts the process, so leave now, with the signal's status
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if signal.SIGINT in received else 0)
    if scheduler.load_error is not None:
        _fail(f"could not load the model: {scheduler.load_error}", code=1)
    if not server.started:
        raise SystemExit(1)  # uvicorn could not start; it has printed why
    if signal.SIGINT in received:
        raise SystemExit(130)  # Ctrl-C: the shell convention


if __name__ == "__main__":
    main()
