"""`python -m server` (== `kiln serve`): flags -> settings -> app -> uvicorn.

The model loads on the scheduler's worker thread after the socket is bound, so /health
answers 503 until it is ready (a load failure is printed and the process exits 1).
SIGTERM / Ctrl-C: uvicorn stops accepting, gives in-flight requests (streams included) up to
--shutdown-timeout seconds; a second before that the scheduler stops, so what is left ends with
an error (503, or an error event and [DONE] on a stream), and the process exits.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import threading
import time
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
    from model.cli import default_model_dir, load_engine, resolve_device

    if settings.model_dir is not None and not Path(settings.model_dir).is_dir():
        _fail(f"--model {settings.model_dir!r} is not a directory")
    if settings.model_dir is not None and not (Path(settings.model_dir) / "config.json").is_file():
        _fail(f"--model {settings.model_dir!r} has no config.json: not a model directory (a `kiln export` "
              "output or a Hugging Face Llama/GPT-2 directory)")
    # bind first: a port already in use is said at once, not after the model has loaded
    sock = _bind(settings.host, settings.port)
    if settings.model_dir is None and not (default_model_dir() / "config.json").is_file():
        _fail(f"no --model given and the default model is missing at {default_model_dir()}")

    import torch
    import uvicorn

    from .app import create_app

    torch.set_num_threads(settings.num_threads)
    try:
        torch.set_num_interop_threads(1)  # one worker thread runs the model; no inter-op pool needed
    except RuntimeError:  # already set (parallel work started), harmless
        pass
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")

    def load():
        start = time.perf_counter()
        device = resolve_device(settings.device)
        engine = load_engine(settings.model_dir, device, settings.dtype, quantization=settings.quantization,
                             prefill_dtype=settings.prefill_dtype,
                             max_batch_size=settings.batch_size_for(device), max_seq_len=settings.max_model_len,
                             block_size=settings.kv_block_size, num_blocks=settings.num_kv_blocks,
                             gpu_memory_fraction=settings.gpu_memory_fraction,
                             enable_prefix_caching=settings.enable_prefix_caching,
                             max_prefill_tokens=settings.max_prefill_tokens, cuda_graphs=settings.cuda_graphs,
                             compile=settings.compile, async_scheduling=settings.async_scheduling,
                             speculative_tokens=settings.speculative_tokens)
        cache = engine.cache
        log = logging.getLogger("kiln.server")
        log.info(
            "model %r loaded in %.2f s: %s %s, context %d tokens, up to %d sequences, KV pool %d blocks x %d "
            "tokens (%.1f MiB, prefix caching %s), prefill chunk %d tokens (in %s), decode %s%s%s",
            settings.served_model_name, time.perf_counter() - start, engine.device,
            str(engine.dtype).removeprefix("torch."),
            engine.max_seq_len, engine.max_batch_size, cache.num_blocks, cache.block_size,
            cache.k.nbytes * 2 / 2**20, "on" if engine.pool.enable_prefix_caching else "off",
            engine.max_prefill_tokens, str(engine.prefill_dtype).removeprefix("torch."), engine.decode_path,
            ", async scheduling" if engine.async_scheduling else "",
            f", prompt-lookup speculation for greedy requests (up to {engine.speculative_tokens} drafts per step)"
            if engine.speculating else "")
        if engine.build_native_in_background():
            log.info("building the native CPU decode step in the background (once per machine, about half a "
                     "minute; `make serve` does it ahead); decoding with the torch path meanwhile")
        if settings.chat_template is None and engine.tokenizer.chat_template is not None:
            from model.chat_template import ChatTemplate

            try:
                ChatTemplate(engine.tokenizer.chat_template)
            except ValueError as e:
                log.warning("/v1/chat/completions will answer 400: this model's tokenizer ships a chat template "
                            "Kiln cannot use (%s); pass --chat-template FILE", e)
        warm_start = time.perf_counter()
        warmed = engine.warm_up_prefill()
        if warmed:
            log.info("prefill attention compiled and tuned for %d (queries, keys) length pairs up to %d tokens "
                     "in %.1f s", len(warmed), warmed[-1][1], time.perf_counter() - warm_start)
        if engine.compile_seconds is not None:
            log.info("decode step compiled in %.1f s (batch buckets up to %d)", engine.compile_seconds,
                     engine.max_batch_size)
        elif engine.compile_error is not None:
            log.warning("--compile: the decode step is not compiled: %s", engine.compile_error)
        return engine

    app = create_app(load, settings)
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
    if scheduler.load_error is not None:
        _fail(f"could not load the model: {scheduler.load_error}", code=1)
    if not server.started:
        raise SystemExit(1)  # uvicorn could not start; it has printed why
    if signal.SIGINT in received:
        raise SystemExit(130)  # Ctrl-C: the shell convention


if __name__ == "__main__":
    main()
