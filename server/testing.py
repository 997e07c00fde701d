"""Helpers to exercise a server for real: a live uvicorn, and a tiny model that knows its text.

`LiveServer` runs an app under uvicorn on a free loopback port in a background thread,
for tests, notebooks and benchmarks that need a real socket (the openai SDK, lm-eval,
curl). The socket is bound before the thread starts, so the port is known and free;
leaving the `with` block shuts uvicorn down (lifespan included) and joins the thread.

    with LiveServer(create_app(engine, settings)) as server:
        httpx.get(server.url + "/health")

`SlowEngine` wraps an engine so every step takes a little longer, to catch requests mid-flight.
`train_parrot()` overfits a tiny model on a few texts (a second of CPU), so greedy
decoding from a text's first tokens reproduces it and stops with EOS: end-to-end tests
then see real words, multi-byte characters split across tokens, and stop strings.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn


class SlowEngine:
    """A real engine whose steps take at least `delay` seconds more, so requests can be caught mid-flight."""

    def __init__(self, engine, delay: float):
        self._engine = engine
        self.delay = delay

    def step(self):
        time.sleep(self.delay)
        return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


class LiveServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, shutdown_timeout_s: float = 5.0,
                 log_level: str = "warning", start_timeout_s: float = 30.0, **uvicorn_options):
        self.app = app
        self.host = host
        self.port = port
        self.shutdown_timeout_s = shutdown_timeout_s
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.uvicorn_options = uvicorn_options  # more `uvicorn.Config` arguments (http="h11", ...)
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> LiveServer:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self.host, self.port))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on",
                                timeout_graceful_shutdown=self.shutdown_timeout_s, **self.uvicorn_options)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.shutdown_timeout_s + 35.0)
        if self._socket is not None:
            self._socket.close()


def train_parrot(model_dir: str | Path, texts: list[str], out_dir: str | Path, steps: int = 60,
                 lr: float = 2e-2, seed: int = 0) -> Path:
    """Fine-tune the model in `model_dir` on `texts` (each followed by EOS) until it recites them.

    Writes a Kiln model directory (weights + tokenizer) to `out_dir` and returns it.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster than two fighting
    try:
        return _train(model_dir, texts, Path(out_dir), steps, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _train(model_dir, texts, out: Path, steps: int, lr: float, seed: int) -> Path:
    import torch

    from model.checkpoint import load_model, save_model
    from model.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    model = load_model(model_dir, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    sequences = [tokenizer.encode_prompt(text) + [tokenizer.eos_id] for text in texts]
    T = max(len(s) for s in sequences)
    if T > model.config.max_seq_len + 1:
        raise ValueError(f"texts of {T} tokens do not fit the context of {model.config.max_seq_len}")
    rows = torch.tensor([s + [tokenizer.eos_id] * (T - len(s)) for s in sequences])  # (B, T)
    targets = torch.tensor([s[1:] + [-100] * (T - len(s)) for s in sequences])  # (B, T - 1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = model(rows[:, :-1], targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    save_model(model, out)
    tokenizer.save(out)
    return out
