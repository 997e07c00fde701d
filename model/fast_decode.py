"""The lean decode step: one new token per sequence, as few tensor ops as the math allows.

At the default model's size a decode step is a few MFLOP; on a CPU its time goes to per-op
dispatch and Python, not arithmetic. `DecodePlan` is built once from a loaded
`Transformer` and runs the same math as `Transformer.forward` with a `CacheBatch`, minus
the overhead:

- for models up to FOLD_LIMIT_BYTES of weights, every norm's gain (and LayerNorm's bias)
  is folded into a copy of the linear layer that reads it, at build time:
  `W @ (g * n) + b == (W * g) @ n + b`; RMSNorm becomes `x * rsqrt(mean(x^2) + eps)` and
  LayerNorm an affine-free `layer_norm` (the final norm folds into a private copy of the
  LM head, so tied embeddings stay untouched); larger models keep their weights as they
  are and apply the norms as modules, and from PACKED_DECODE_MIN_BATCH rows on read their
  matrices through the oneDNN packs made for prefill (model/cpu_packing), at every batch size
  once `read_modules()` hands the matrices to the modules (a server then frees the fp32 originals);
- one flat loop over pre-extracted weights (`_body`, on plain tensors): no module calls,
  hooks or attribute lookups; the attention reads the paged cache through the block table
  (`paged_decode_attention`).

Two ways to run `_body` faster, both optional and both checked against it by the tests:
- `enable_native(module)`: the whole step as one C++ call (model/native), for batches up to
  NATIVE_MAX_BATCH (larger ones run `_body`, whose GEMMs win there), for small fp32 models,
  larger ones stored in bf16, and int8-quantized ones (model/quantize.py); it reads its own
  packed copy of the unfolded matrices, in bf16 when that is exact (int8: the modules' tiles);
- `compile(cache, max_batch_size)`: `_body` through torch.compile (inductor, C++ wrapper),
  one static graph per batch bucket, the attention a custom op so the cache writes stay in
  place (`kiln serve --compile`).

The plain path stays the reference: tests assert these give the same greedy tokens and
log-probabilities within 1e-4. Used for the torch backend only (on CUDA the Triton decode
kernel path runs through the model, replayed from CUDA graphs).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import cached_keys, store_keys
from .cpu_packing import dense_weight, exactly_bf16, fits_in_memory, pack_weight
from .cuda_graphs import batch_buckets
from .kv_cache import NULL_BLOCK, CacheBatch, KVCache
from .quantize import is_quantized, pack_tiles
from .transformer import Transformer, apply_rope


# Folding copies the matrices that read a norm (qkv, MLP up, LM head). Worth it for small
# models, where every op counts; for large ones the copies would double the memory, so the
# plan keeps the original weights and applies the gains as one more op.
FOLD_LIMIT_BYTES = 256 * 2**20
# The native step measured 1.2-1.3x the torch path at batch 64 and even with it at 128-256
# (bench/cpu_decode_step.py, default model, 2 cores): above 64 the torch path's GEMMs (oneDNN /
# MKL) are left to it. On a GPT-2 124M-shaped bf16 checkpoint its bf16 matrices beat the torch
# path's oneDNN packs 2.9x at 4 rows, 2.5x at 8, 2.0x at 16 and 1.6x at 32.
NATIVE_MAX_BATCH = 64
# Unfolded models' torch-path steps (no native step) from this many rows on run their matrices through
# the oneDNN packs made for prefill (model/cpu_packing): GPT-2 124M shape, 2 cores, whole decode steps
# vs F.linear: 0.84x at 2 rows, 0.90x at 3, 1.22x at 4, 1.26x at 6, 1.36x at 8 (MKL's F.linear slows
# down sharply at 4 rows). That was an Intel Xeon; on a 2-vCPU AMD EPYC the packs won at every size (Qwen3-0.6B
# shape, 24 greedy tokens: 1.6x at 1 row, 2.5x at 2). Plans that `read_modules` (a server's) use them always.
PACKED_DECODE_MIN_BATCH = 4
# Short prefill chunks run through the native step too, one row per prompt token (Engine._prefill_native),
# up to this many tokens per step; measured against the forward (prefill + first token, in-process, no prefix
# cache): default model 1.4 vs 6.4 ms at 8 tokens, 5.9 vs 10.1 at 64; GPT-2 124M shape in int8 15 vs 95 ms at 8,
# 100 vs 144 at 64. Unfolded float models' forward has the oneDNN packs: the native bf16 step won at 8 tokens
# (16.8 vs 36.5 ms), tied at 32 and lost at 64 (98.5 vs 74.8), hence their lower limit.
NATIVE_PREFILL_MAX_TOKENS = 64
NATIVE_PREFILL_MAX_TOKENS_PACKED = 16


@dataclass
class _Layer:
    # the matrices and biases; None (all of them) where the torch path calls the modules (quantized plans, and
    # unfolded ones after `read_modules`)
    qkv_w: torch.Tensor | None
    qkv_b: torch.Tensor | None
    proj_w: torch.Tensor | None
    proj_b: torch.Tensor | None
    up_w: torch.Tensor | None
    up_b: torch.Tensor | None
    down_w: torch.Tensor | None
    down_b: torch.Tensor | None
    norm1: torch.nn.Module | None  # None when folded into qkv_w
    norm2: torch.nn.Module | None  # None when folded into up_w
    # unfolded plans: the modules whose weights these are (their oneDNN packs, model/cpu_packing; or Int8Linear)
    modules: tuple[torch.nn.Module, ...] = ()
    # qk_norm models (Qwen3): the attention's `norm_qk`, each query and key head normalized before rotary
    norm_qk: Callable[[torch.Tensor], torch.Tensor] | None = None


def _fold(norm: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
    """The linear layer that reads norm(x), rewritten to read the gain-free normalized x."""
    gain = norm.weight
    folded_w = weight * gain[None, :]
    folded_b = bias
    if isinstance(norm, torch.nn.LayerNorm) and norm.bias is not None:
        shift = weight @ norm.bias
        folded_b = shift if bias is None else bias + shift
    return folded_w.contiguous(), None if folded_b is None else folded_b.contiguous()


class DecodePlan:
    def __init__(self, model: Transformer):
        config = model.config
        self.model = model
        self.H, self.Hkv, self.D = config.n_head, config.n_kv_head, config.dim_per_head
        self.rms = config.norm == "rmsnorm"
        self.eps = config.norm_eps
        self.d_model = config.d_model
        self.swiglu = config.mlp == "swiglu"
        self.d_ff = config.d_ff
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # int8 matrices (model/quantize.py): never folded or copied; the torch path calls the modules
        self.quantized = is_quantized(model)
        self.folded = weight_bytes <= FOLD_LIMIT_BYTES and not self.quantized
        self.calls_modules = self.quantized  # the torch path calls the linear modules (no matrices of its own)

        def matrix(linear):  # (weight, bias) as the torch path reads them
            return (None, None) if self.calls_modules else (linear.weight, linear.bias)

        def reading(norm, linear):  # (weight, bias, norm to apply first or None)
            if self.folded:
                return (*_fold(norm, linear.weight, linear.bias), None)
            return (*matrix(linear), norm)

        with torch.no_grad():
            self.layers = []
            for block in model.blocks:
                qkv_w, qkv_b, norm1 = reading(block.norm1, block.attn.qkv)
                up_w, up_b, norm2 = reading(block.norm2, block.mlp.up)
                linears = () if self.folded else (block.attn.qkv, block.attn.proj, block.mlp.up, block.mlp.down)
                self.layers.append(_Layer(qkv_w, qkv_b, *matrix(block.attn.proj), up_w, up_b, *matrix(block.mlp.down),
                                          norm1, norm2, linears,
                                          block.attn.norm_qk if config.qk_norm else None))
            self.head_w, self.head_b, self.final_norm = reading(model.norm, model.lm_head)
        self._head_packs: dict[int, torch.Tensor] = {}  # batch size -> oneDNN-packed head (pack_head)
        self._compiled = None  # the step compiled per batch bucket (compile())
        self._native = None  # the native C++ step (model/native), when enabled
        self._native_args: tuple | None = None
        self.native_dtype: torch.dtype | None = None  # the native step's packed matrices: fp32, bf16 or int8
        self._large_native_ok: bool | None = None  # unfolded models: bf16-exact and the copy fits (cached)
        self._buckets: list[int] = []
        self._static: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pack_head(self, batch_sizes: list[int]) -> None:
        """Prepack the LM head for oneDNN at the given batch sizes (CPU builds with mkldnn).

        The head is the biggest matrix of a decode step and plain GEMV runs it on one core;
        oneDNN's prepacked path is about 2x faster at batch 1 and 3x at batch 8 here. Each
        pack is a copy of the head, so only small (folded) models get them. A pack that does
        not reproduce F.linear to fp32 rounding is dropped.
        """
        if not self.folded:
            return
        for size in sorted(set(batch_sizes)):
            packed = pack_weight(self.head_w, self.head_b, size)
            if packed is None:
                return
            self._head_packs[size] = packed

    def read_modules(self) -> None:
        """From now on the torch path calls the unfolded model's linear modules instead of reading their fp32
        matrices itself, and the plan drops its references to them: so `cpu_packing.pack_linears(release=True)`
        can free them, the modules then running their oneDNN packs at every batch size. (Folded plans hold
        copies of their own; quantized ones call the modules already.)"""
        if self.folded or self._compiled is not None:
            raise ValueError("read_modules applies to unfolded plans that are not compiled")
        if self.calls_modules:
            return
        self.layers = [replace(layer, qkv_w=None, qkv_b=None, proj_w=None, proj_b=None, up_w=None, up_b=None,
                               down_w=None, down_b=None) for layer in self.layers]
        self.head_w = self.head_b = None
        self.calls_modules = True

    def _use_packs(self, batch_size: int) -> bool:
        """Whether an unfolded (large) model's step reads its matrices through the oneDNN packs that
        `pack_linears` made for prefill: from PACKED_DECODE_MIN_BATCH rows on they beat F.linear (MKL),
        below it they lose. Compiled steps keep F.linear (inductor packs its own)."""
        return batch_size >= PACKED_DECODE_MIN_BATCH and not self.folded and not torch.compiler.is_compiling()

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, d) -> logits (B, V), through the pack made for the nearest batch size at or above B."""
        if self.calls_modules:
            return self.model.lm_head(h)
        fits = [size for size in self._head_packs if size >= h.shape[0]]
        if not fits:
            if self._use_packs(h.shape[0]):
                return _packed_linear(h, self.head_w, self.head_b, self.model.lm_head)
            return F.linear(h, self.head_w, self.head_b)
        packed = self._head_packs[min(fits)]
        return torch.ops.mkldnn._linear_pointwise(h, packed, self.head_b, "none", [], "")

    @staticmethod
    def supports(model: Transformer) -> bool:
        return model.embed.weight.device.type == "cpu"

    def _norm(self, x: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
        if norm is not None:  # not folded: the module itself, gain included
            return norm(x)
        if self.rms:
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(self.eps))
        return F.layer_norm(x, (self.d_model,), eps=self.eps)

    # ---- the native C++ step ------------------------------------------------------------------
    def supports_native(self) -> bool:
        """The native step covers fp32 CPU models: small (folded-size) ones, int8-quantized ones
        (model/quantize.py), and larger ones whose matrices are all exactly bf16 numbers (checkpoints
        stored in bf16, as most on the Hugging Face hub are), whose extra bf16 copy (half the fp32
        weights) fits in memory; for the last, reading half the bytes is what beats the torch path."""
        if self.model.embed.weight.dtype != torch.float32:
            return False
        if self.folded or self.quantized:
            return True
        if self._large_native_ok is None:
            self._large_native_ok = self._large_native_fits()
        return self._large_native_ok

    def _large_native_fits(self) -> bool:
        model = self.model
        linears = [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
        linears.append(model.lm_head)
        return (fits_in_memory(2 * sum(m.in_features * m.out_features for m in linears))[0]
                and all(exactly_bf16(dense_weight(m)) for m in linears))

    @property
    def native_prefill_max_tokens(self) -> int:
        """Prefill chunks of at most this many tokens (all rows together) run through the native step,
        one row per token, when it is on; longer ones run the model's forward."""
        return NATIVE_PREFILL_MAX_TOKENS if self.folded or self.quantized else NATIVE_PREFILL_MAX_TOKENS_PACKED

    @property
    def native_max_batch(self) -> int:
        """The largest batch the native step runs (larger ones take the torch path)."""
        return NATIVE_MAX_BATCH

    def enable_native(self, module, dtype: torch.dtype | None = None) -> None:
        """Run decode steps through `module.decode_step` (model/native) from now on.

        The step gets the model's own matrices, packed in tiles, and applies the norm gains
        itself. `dtype` None packs the matrices as bf16 when every one of them is exactly a bf16
        number (weights shipped in bf16, loaded as fp32), which halves the bytes a step reads and
        changes no result, else as fp32; torch.float32 forces fp32 (for comparisons). A quantized
        model's int8 tiles and row scales are passed as they are (no copy)."""
        if not self.supports_native():
            raise ValueError("the native decode step covers fp32 models: small ones, int8-quantized ones, and "
                             "larger ones whose matrices are exactly bf16 numbers and whose bf16 copy fits in memory")
        if dtype not in (None, torch.float32):
            raise ValueError(f"dtype must be None (automatic) or torch.float32, got {dtype}")
        model = self.model
        blocks = list(model.blocks)
        linears = [m for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)] + [model.lm_head]
        if self.quantized:
            dtype = torch.int8
        elif dtype is None:
            exact = not self.folded or all(exactly_bf16(dense_weight(m)) for m in linears)
            dtype = torch.bfloat16 if exact else torch.float32

        def opt(t: torch.Tensor | None) -> torch.Tensor:
            return torch.empty(0) if t is None else t.detach().float().contiguous()

        def linear(m: torch.nn.Module) -> list[torch.Tensor]:
            return [m.tiles if self.quantized else pack_tiles(dense_weight(m), dtype=dtype), opt(m.bias)]

        def norm(m: torch.nn.Module) -> list[torch.Tensor]:
            return [opt(m.weight), opt(getattr(m, "bias", None))]

        with torch.no_grad():
            weights = []
            for b in blocks:
                weights += [*norm(b.norm1), *linear(b.attn.qkv), *linear(b.attn.proj),
                            *norm(b.norm2), *linear(b.mlp.up), *linear(b.mlp.down)]
            weights += [opt(model.embed.weight), opt(model.pos_embed.weight if not self.rms else None),
                        opt(model.rope_cos if self.rms else None), opt(model.rope_sin if self.rms else None),
                        *norm(model.norm), *linear(model.lm_head)]
            if self.quantized:  # then each matrix's row scales, in the same order: per layer qkv, proj, up, down; head
                weights += [m.scale for m in linears]
            qk_norm = model.config.qk_norm
            if qk_norm:  # then each layer's query and key head gains
                weights += [opt(n.weight) for b in blocks for n in (b.attn.q_norm, b.attn.k_norm)]
        dims = [self.H, self.Hkv, self.D, self.d_model, self.d_ff, int(self.rms), int(self.swiglu),
                linears[-1].out_features, int(qk_norm)]
        self.native_dtype = dtype
        self._native_args = (weights, dims, float(self.eps))
        self._native = module  # last: the worker thread may be mid-step and reads this once per call

    def disable_native(self) -> None:
        """Back to the torch path (for comparisons)."""
        self._native = None

    @property
    def native(self) -> bool:
        return self._native is not None

    @property
    def native_module(self):
        """The compiled module (model/native) when the native step is on, else None."""
        return self._native

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, kv_cache: KVCache, batch: CacheBatch) -> torch.Tensor:
        """tokens (B, 1) -> logits (B, V); writes each row's keys/values into its blocks."""
        native = self._native
        if native is not None and tokens.shape[0] <= self.native_max_batch:
            weights, dims, eps = self._native_args
            return native.decode_step(tokens.reshape(-1), batch.positions.reshape(-1), batch.block_table,
                                      kv_cache.k, kv_cache.v, weights, dims, eps)
        if self._compiled is not None and tokens.shape[0] <= self._buckets[-1]:
            hidden = self._run_compiled(tokens, kv_cache, batch)
        else:
            meta = torch.tensor([batch.kv_len, -1 if batch.contiguous_from is None else batch.contiguous_from])
            hidden = self._body(tokens, batch.positions, batch.write_blocks, batch.write_offsets, batch.block_table,
                                batch.lengths, meta, kv_cache.k, kv_cache.v, paged_decode_attention)
        return self._head(hidden)

    def _body(self, tokens, positions, write_blocks, write_offsets, block_table, lengths, meta, k_cache, v_cache,
              attention) -> torch.Tensor:
        """The step on plain tensors, so torch.compile can trace it: tokens (B, 1) -> final hidden (B, d).

        `attention` is `paged_decode_attention`, or the same function as a custom op when compiled."""
        model = self.model
        B = tokens.shape[0]
        H, Hkv, D = self.H, self.Hkv, self.D
        x = F.embedding(tokens, model.embed.weight)  # (B, 1, d)
        if self.rms:
            cos = model.rope_cos[positions][:, :, None, :]  # (B, 1, 1, D)
            sin = model.rope_sin[positions][:, :, None, :]
        else:
            x = x + F.embedding(positions, model.pos_embed.weight)
        linear = _module_linear if self.calls_modules else _packed_linear if self._use_packs(B) else _plain_linear
        for i, layer in enumerate(self.layers):
            qkv_m, proj_m, up_m, down_m = layer.modules or (None,) * 4
            qkv = linear(self._norm(x, layer.norm1), layer.qkv_w, layer.qkv_b, qkv_m)  # (B, 1, (H + 2Hkv) D)
            qk = qkv[..., : (H + Hkv) * D].view(B, 1, H + Hkv, D)
            if layer.norm_qk is not None:
                qk = layer.norm_qk(qk)
            if self.rms:
                qk = apply_rope(qk, cos, sin)
            v = qkv[..., (H + Hkv) * D:].view(B, 1, Hkv, D)
            y = attention(qk[:, :, :H].transpose(1, 2), qk[:, :, H:], v, k_cache[i], v_cache[i], write_blocks,
                          write_offsets, block_table, lengths, meta)  # (B, H, 1, D)
            x = x + linear(y.transpose(1, 2).reshape(B, 1, H * D), layer.proj_w, layer.proj_b, proj_m)
            h = linear(self._norm(x, layer.norm2), layer.up_w, layer.up_b, up_m)
            if self.swiglu:
                h = F.silu(h[..., : self.d_ff]) * h[..., self.d_ff:]
            else:
                h = F.gelu(h, approximate="tanh")
            x = x + linear(h, layer.down_w, layer.down_b, down_m)
        return self._norm(x[:, 0], self.final_norm)  # (B, d)

    # ---- torch.compile ------------------------------------------------------------------------
    def compile(self, cache: KVCache, max_batch_size: int) -> float:
        """Compile the step with inductor (C++ wrapper) for the batch buckets up to max_batch_size and
        warm each up now; returns the seconds it took. Raises if compilation fails (the caller then
        stays eager). Shapes are static per bucket -- a smaller batch is padded with rows that write
        into the null block -- so serving never recompiles."""
        start = time.perf_counter()
        buckets = batch_buckets(max_batch_size)
        width = cache.max_blocks_per_seq
        static = {size: (torch.full((size, width), NULL_BLOCK, dtype=torch.int64), torch.ones(size, dtype=torch.int32))
                  for size in buckets}
        import torch._dynamo as dynamo

        # one graph per bucket, and dynamo counts every plan's graphs against one code object (`_body`)
        name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
        compiled = torch.compile(self._body, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
        op = _attention_op()
        with torch.inference_mode():
            for size in buckets:
                zeros = torch.zeros(size, 1, dtype=torch.long)
                table, lengths = static[size]
                for _ in range(2):
                    compiled(zeros, zeros, zeros, zeros, table, lengths, torch.tensor([1, -1]), cache.k, cache.v, op)
        self._buckets, self._static, self._compiled = buckets, static, compiled
        return time.perf_counter() - start

    def _run_compiled(self, tokens: torch.Tensor, kv_cache: KVCache, batch: CacheBatch) -> torch.Tensor:
        B = tokens.shape[0]
        size = next(b for b in self._buckets if b >= B)
        table, lengths = self._static[size]
        table[:B, : batch.block_table.shape[1]] = batch.block_table  # columns past a row's length are never read
        lengths[:B] = batch.lengths
        positions, write_blocks, write_offsets = batch.positions, batch.write_blocks, batch.write_offsets
        if size > B:  # padding rows: token 0 at position 0, written into the null block, attending to one key
            pad = (0, 0, 0, size - B)
            tokens, positions, write_blocks, write_offsets = (
                F.pad(t, pad) for t in (tokens, positions, write_blocks, write_offsets))
            table[B:] = NULL_BLOCK
            lengths[B:] = 1
        view_start = batch.contiguous_from if batch.contiguous_from is not None and size == 1 else -1
        hidden = self._compiled(tokens, positions, write_blocks, write_offsets, table, lengths,
                                torch.tensor([batch.kv_len, view_start]), kv_cache.k, kv_cache.v, _attention_op())
        return hidden[:B]


def _module_linear(x: torch.Tensor, weight: None, bias: None, module: torch.nn.Module) -> torch.Tensor:
    return module(x)  # an Int8Linear (model/quantize.py), or a linear layer's oneDNN pack (`read_modules`)


def _plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   module: torch.nn.Linear | None) -> torch.Tensor:
    """F.linear through the module's oneDNN pack (model/cpu_packing) when it has a current one."""
    packed = getattr(module, "_kiln_packed", None)
    if packed is None or module.weight._version != module._kiln_packed_version:
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def paged_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, write_blocks: torch.Tensor, write_offsets: torch.Tensor,
                           block_table: torch.Tensor, lengths: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """One decode step's attention for one layer of the paged cache (the torch CPU path).

    q (B, H, 1, D); k_new/v_new (B, 1, Hkv, D); k_cache/v_cache one layer of the pool (num_blocks,
    block_size, Hkv, D); meta = [kv_len, first block of a single row whose blocks are consecutive or -1].
    Writes the new keys/values, then attends over each row's first lengths[b] keys. Returns (B, H, 1, D)."""
    store_keys(k_new, v_new, k_cache, v_cache, write_blocks, write_offsets)
    kv_len, view_start = meta.tolist()
    keys, values = cached_keys(k_cache, v_cache, block_table, kv_len, view_start if view_start >= 0 else None,
                               q.dtype)  # (B, Hkv, L, D)
    mask = None
    if q.shape[0] > 1:
        mask = (torch.arange(kv_len, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != keys.shape[1])


@functools.cache
def _attention_op():
    """`paged_decode_attention` as a torch custom op: opaque to torch.compile (its shapes depend on
    the lengths), declared as writing into the caches."""
    op = torch.library.custom_op("kiln::paged_decode_attention", mutates_args=("k_cache", "v_cache"))(
        paged_decode_attention)

    @op.register_fake
    def _(q, k_new, v_new, k_cache, v_cache, write_blocks, write_offsets, block_table, lengths, meta):
        return torch.empty_like(q)

    return op
