"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

At batch 1 a decode step of a small model is a few hundred kernel launches of a few
microseconds each: launching them from Python costs more than running them. A CUDA graph
records the launches of one step once and replays them with one call.

A graph replays fixed addresses and shapes, so the step reads its inputs from static
buffers sized for the largest bucket: token ids, positions, where each new key/value is
written (block, offset), the block tables (full width: max_blocks_per_seq) and lengths.
A batch of B rows runs the graph of the smallest bucket >= B; the padding rows write
into the null block and attend over one key of it, and their logits are dropped. The
attention inside is the Triton decode kernel (it reads the block tables on the device,
with a split count fixed by the cache's capacity), so nothing in the step depends on a
host-side length and the step never syncs.

`GraphedDecode(..., capture=False)` runs the same static-buffer step eagerly: the CPU
tests use it (with the Triton interpreter) to check the bucketing and padding, which
are the parts a capture does not change. After capturing, each graph is checked once
against the eager step on dummy inputs; a mismatch (or a capture error) disables the
graphs with a warning rather than serving wrong tokens.
"""

from __future__ import annotations

import logging

import torch

from .kv_cache import NULL_BLOCK, CacheBatch, KVCache
from .transformer import Transformer

log = logging.getLogger("kiln.cuda_graphs")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def describe_failure(exc: BaseException) -> str:
    """`Type: first line of the message`, for a log line or a setting that says why compiling failed."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def batch_buckets(max_batch_size: int) -> list[int]:
    return sorted({b for b in BUCKETS if b < max_batch_size} | {max_batch_size})


class GraphedDecode:
    """``compile=True`` runs the step through ``torch.compile`` (one dynamic-shape graph for every
    bucket; the Triton decode kernel is an opaque custom op in it) before capturing, so that
    inductor fuses the step's small elementwise kernels (norms, RoPE, SwiGLU, residuals) as
    gpt-fast does. ``compile_seconds`` is how long compiling took; a compile failure leaves the
    step eager (``compile_error`` says why)."""

    def __init__(self, model: Transformer, cache: KVCache, max_batch_size: int, capture: bool = True,
                 compile: bool = False):
        from .attention import resolve_backend

        if resolve_backend(model.attn_backend, cache.k.device, model.config.dim_per_head) != "triton":
            raise ValueError("graphed decode needs the triton attention backend (it reads block tables on the device)")
        self.model = model
        self.cache = cache
        self.buckets = batch_buckets(max_batch_size)
        device = cache.k.device
        B, W = self.buckets[-1], cache.max_blocks_per_seq
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.write_blocks = torch.full((B, 1), NULL_BLOCK, dtype=torch.long, device=device)
        self.write_offsets = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.block_table = torch.full((B, W), NULL_BLOCK, dtype=torch.long, device=device)
        self.lengths = torch.ones(B, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.enabled = True
        self.compile_seconds: float | None = None
        self.compile_error: str | None = None
        self._compiled = None
        if compile:
            self._compile()
        if capture:
            self._capture_all()

    def _inputs(self, size: int) -> tuple[torch.Tensor, ...]:
        """The static buffers' first `size` rows (views: a replay reads them in place)."""
        return (self.tokens[:size], self.positions[:size], self.write_blocks[:size], self.write_offsets[:size],
                self.block_table[:size], self.lengths[:size])

    def _step(self, size: int) -> torch.Tensor:
        return (self._compiled or self._eager_step)(*self._inputs(size))

    def _eager_step(self, tokens, positions, write_blocks, write_offsets, block_table, lengths) -> torch.Tensor:
        batch = CacheBatch(positions=positions, write_blocks=write_blocks, write_offsets=write_offsets,
                           block_table=block_table, lengths=lengths, kv_len=self.cache.max_seq_len,
                           block_size=self.cache.block_size, mask=None, contiguous_from=None)
        return self.model(tokens, kv_cache=self.cache, batch=batch)[:, -1]  # (size, V)

    @torch.inference_mode()
    def _compile(self) -> None:
        """Compile the step and run it once per bucket (the compile happens on the first run)."""
        import time

        started = time.perf_counter()
        compiled = torch.compile(self._eager_step, fullgraph=True, dynamic=True)
        try:
            for size in self.buckets:
                self._reset_padding(0, size)  # padding rows write only into the null block
                compiled(*self._inputs(size))
        except Exception as e:  # noqa: BLE001 -- an inductor or tracing failure: the eager step serves
            self.compile_error = describe_failure(e)
            log.warning("the decode step is not compiled, it runs eagerly: %s", self.compile_error)
            log.debug("why the decode step did not compile", exc_info=True)  # Dynamo names the user frame
            return
        self._compiled = compiled
        self.compile_seconds = time.perf_counter() - started

    def _reset_padding(self, start: int, stop: int) -> None:
        """Rows start..stop-1 become harmless: write into the null block, attend over its first key."""
        self.tokens[start:stop] = 0
        self.positions[start:stop] = 0
        self.write_blocks[start:stop] = NULL_BLOCK
        self.write_offsets[start:stop] = 0
        self.block_table[start:stop] = NULL_BLOCK
        self.lengths[start:stop] = 1

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        try:
            for size in reversed(self.buckets):  # the largest first: later graphs reuse its memory
                self._reset_padding(0, size)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: Triton compiles/autotunes outside the capture
                        expected = self._step(size)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._step(size)
                graph.replay()
                torch.cuda.synchronize()
                if not torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2):
                    raise RuntimeError(f"graph replay of bucket {size} differs from the eager step")
                self._graphs[size] = (graph, out)
        except Exception as e:  # noqa: BLE001 -- any capture failure means: serve eagerly instead
            log.warning("CUDA graphs disabled, decoding eagerly: %s", e)
            self._graphs.clear()
            self.enabled = False

    def bucket(self, size: int) -> int:
        return next(b for b in self.buckets if b >= size)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, batch: CacheBatch) -> torch.Tensor:
        """tokens (B, 1), batch from KVCache.batch for one new token per row -> logits (B, V)."""
        B = tokens.shape[0]
        size = self.bucket(B)
        width = batch.block_table.shape[1]
        self.tokens[:B].copy_(tokens)
        self.positions[:B].copy_(batch.positions)
        self.write_blocks[:B].copy_(batch.write_blocks)
        self.write_offsets[:B].copy_(batch.write_offsets)
        self.block_table[:B, :width].copy_(batch.block_table)  # columns past a row's length are never read
        self.lengths[:B].copy_(batch.lengths)
        if B < size:
            self._reset_padding(B, size)
        if size in self._graphs:
            graph, out = self._graphs[size]
            graph.replay()
            return out[:B]
        return self._step(size)[:B]
