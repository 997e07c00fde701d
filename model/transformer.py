"""The Kiln decoder: embeddings, pre-norm blocks, final norm, LM head; one forward.

The same `forward` serves training (tokens + targets -> loss), scoring (tokens ->
logits for every position) and serving (tokens + a `CacheBatch` -> logits for one
position per row, with this step's keys/values written into the KV cache).

Projections are stored fused (one QKV matmul, one gate+up matmul for SwiGLU): on a
CPU at small widths the time goes to per-op dispatch, so fewer, larger matmuls win.
Checkpoint loading maps Hugging Face's separate q/k/v and gate/up tensors into them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (attend_cached, cached_attention, cached_keys, causal_attention, resolve_backend,
                        store_keys)
from .config import ModelConfig
from .cpu_training import native_causal_attention, native_loss_rows, use_native_module
from .kv_cache import CacheBatch, KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: bf16 loses precision in the mean of squares
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


@contextlib.contextmanager
def skipped_init():
    """Build modules without initializing their weights (they are about to be loaded): `torch.nn.init`'s
    functions return their tensor untouched meanwhile, as transformers' `no_init_weights` does. On the meta
    device they would run torch's Python reference ops, whose first call imports torch._dynamo: about 2.5 s
    of a server's start-up, for values that are thrown away. (The patch is process-wide while it lasts:
    only construction runs inside it.)"""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_", "xavier_uniform_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, _return_tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _return_tensor(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def rope_tables(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables (max_seq_len, head_dim) in the rotate-half layout (as HF Llama).

    rotate_half(x) = [-x2, x1] = roll(x, D/2) * [-1.., +1..], so the sign is folded into
    the sin table and `apply_rope` needs one roll and one fused multiply-add.
    """
    D = config.dim_per_head
    inv_freq = scaled_inv_freq(config, 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64,
                                                                                   device=device) / D)))
    t = torch.arange(config.max_seq_len, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq)  # (S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, D)
    sign = torch.cat([-torch.ones(D // 2, dtype=torch.float64, device=device),
                      torch.ones(D // 2, dtype=torch.float64, device=device)])
    return emb.cos().float(), (emb.sin() * sign).float()


def scaled_inv_freq(config: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """The rotary frequencies after `config.rope_scaling` (as transformers' rope init functions)."""
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":  # positions / factor
        return inv_freq / factor
    # llama3: wavelengths longer than original / low_freq_factor are stretched by `factor`, shorter than
    # original / high_freq_factor kept, and those between interpolated smoothly
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, stretched)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/signed_sin (B, T, 1, D): x * cos + rotate_half(x) * sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.dim_per_head
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=config.has_attention_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.proj.residual_scale = True
        if config.qk_norm:  # each query and key head normalized before rotary (Qwen3)
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """qk (..., H + Hkv, D), the queries' heads then the keys': with `qk_norm`, each head RMS-normalized
        with its kind's gain (a new tensor); without, qk itself."""
        if self.q_norm is None:
            return qk
        return torch.cat([self.q_norm(qk[..., : self.n_head, :]), self.k_norm(qk[..., self.n_head:, :])], dim=-2)

    def norm_qk_(self, qkv: torch.Tensor) -> torch.Tensor:
        """`norm_qk` in place on a qkv projection's output (..., (H + 2 Hkv) D), for inference; returns it."""
        if self.q_norm is not None:
            qk = qkv[..., : (self.n_head + self.n_kv_head) * self.head_dim]
            qk.copy_(self.norm_qk(qk.unflatten(-1, (-1, self.head_dim))).flatten(-2))
        return qkv

    def forward(self, x, rope, layer_cache, batch: CacheBatch | None, backend: str):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x)
        if backend == "triton" and batch is None and rope is None and self.q_norm is None:
            # self-attention straight from the projection (GPT-2 style: nothing to apply to q and k first); its
            # backward writes the projection's gradient whole
            from kernels.attention import flash_attention_packed

            return self.proj(flash_attention_packed(qkv.view(B, T, H + 2 * Hkv, D), Hkv).reshape(B, T, H * D))
        qk = self.norm_qk(qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D))
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated in one go
        q, k = qk[:, :, :H], qk[:, :, H:]  # (B, T, H, D), (B, T, Hkv, D)
        v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
        if backend == "native":  # (B, T, H, D) in and out: no transposes
            return self.proj(native_causal_attention(q, k, v).reshape(B, T, H * D))
        q = q.transpose(1, 2)  # (B, H, T, D)
        if batch is None:
            y = causal_attention(q, k.transpose(1, 2), v.transpose(1, 2), backend)
        else:
            y = cached_attention(q, k, v, layer_cache[0], layer_cache[1], batch, backend)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    def forward_fused(self, qkv, rope_tables, kv_cache: KVCache, layer: int, batch: CacheBatch, backend: str):
        """The cached forward from the qkv projection's output (B, T, (H + 2 Hkv) D), with rotary embedding
        and the cache write in one kernel (`kernels.rope`)."""
        return self.proj(self.attend_fused(qkv, rope_tables, kv_cache, layer, batch, backend))

    def attend_fused(self, qkv, rope_tables, kv_cache: KVCache, layer: int, batch: CacheBatch, backend: str):
        """`forward_fused` up to the output projection: the attention's output (B, T, H * D)."""
        from kernels.rope import rope_cache_write

        B, T, _ = qkv.shape
        self.norm_qk_(qkv)
        # the whole pool and the layer index, not a view of the layer: see kernels.rope on torch.compile
        q = rope_cache_write(qkv, self.n_head, self.n_kv_head, batch.positions, kv_cache.k, kv_cache.v,
                             batch.write_blocks, batch.write_offsets, *rope_tables, layer=layer)  # (B, T, H, D)
        y = attend_cached(q.transpose(1, 2), kv_cache.k[layer], kv_cache.v[layer], batch, backend)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        self.d_ff = config.d_ff
        width = 2 * config.d_ff if config.mlp == "swiglu" else config.d_ff
        self.up = nn.Linear(config.d_model, width, bias=config.bias)  # swiglu: [gate; up] fused
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.down.residual_scale = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, up = h.split(self.d_ff, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "swiglu":
            return self(x)  # F.gelu is one kernel already
        from kernels.activation import silu_mul

        return self.down(silu_mul(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, layer_cache, batch, backend):
        x = x + self.attn(self.norm1(x), rope, layer_cache, batch, backend)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend
        # inference over the KV cache with the triton backend runs the fused kernels (`_forward_fused`)
        self.fused_inference = True
        # and, on top, decode steps of at most `kernels.gemv.FMA_MAX_ROWS` rows of Llama-style models (RMSNorm,
        # SwiGLU, no biases) run each norm + qkv or gate/up projection, and SwiGLU + down projection, as one
        # `kernels.gemv` product: a batch-1 step 1.16x faster on an H200 (bench/RESULTS.md), off until its
        # end-to-end GPU tests have all run
        self.fused_gemv = False
        # training loss on the triton backend: "chunked" (LM head + cross-entropy a chunk of rows at a time,
        # the (N, V) logits never whole) or "logits" (the whole logits, then the fused cross-entropy kernel)
        self.loss_impl = "chunked"
        # under autocast, carry the residual stream between blocks in the autocast dtype instead of the
        # embeddings' (fp32 master weights give an fp32 stream): training's `residual = "autocast"`
        self.autocast_residual = False
        # the native module (model/native) whose fused elementwise steps the CPU forward runs without autograd
        # in fp32 (`_forward_cpu`): set by the engine when it has the module, None = plain torch ops
        self.cpu_ops = None
        # on a CPU, self-attention without a cache (training, evaluation) and the chunked loss's rows in Kiln's
        # native kernels (`cpu_training`) instead of SDPA and torch ops: set by `use_native_kernels`
        self.native_kernels = False
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if config.positions == "rope":
            if torch.empty(0).device.type == "meta":  # built to be loaded: `init_rope` computes them then
                cos, sin = (torch.empty(config.max_seq_len, config.dim_per_head) for _ in range(2))
            else:
                cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: normal(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = residual_std if getattr(module, "residual_scale", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def use_native_kernels(self, module) -> bool:
        """On a CPU, run self-attention without a cache (the torch backend's training and evaluation forward)
        through `module`'s (model/native) causal attention and its backward, and the chunked loss's rows through
        its `loss_rows_`; False, and nothing changes, when the module is None or lacks them."""
        if not use_native_module(module):
            return False
        self.native_kernels = True
        return True

    def init_rope(self) -> None:
        """Recompute the (non-persistent) rotary tables, e.g. after materializing from the meta device."""
        if self.config.positions == "rope":
            cos, sin = rope_tables(self.config, device=self.embed.weight.device)
            self.rope_cos, self.rope_sin = cos, sin

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, batch: CacheBatch | None = None,
                output_index: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """tokens (B, T) int64.

        - targets (B, T), -100 = ignore: returns the mean cross-entropy loss (scalar).
        - kv_cache + batch: row b's tokens sit at batch.positions[b], their keys/values are
          written into the blocks batch.write_blocks[b]; they attend to everything cached in
          the row's blocks (batch.block_table[b]) before them.
        - output_index (B,): return logits (B, V) only at that position of each row;
          otherwise logits (B, T, V).
        - return_hidden: return the final-norm hidden states instead of logits, so a
          caller can apply the LM head in chunks.
        """
        B, T = tokens.shape
        backend = resolve_backend(self.attn_backend, tokens.device, self.config.dim_per_head)
        if batch is not None and backend == "triton" and self.fused_inference and not torch.is_grad_enabled():
            x = self._forward_fused(tokens, kv_cache, batch, backend)
            if output_index is not None:
                x = x[torch.arange(B, device=x.device), output_index]  # (B, d)
            return x if return_hidden else self.lm_head(x)
        if batch is not None:
            positions = batch.positions  # (B, T)
        else:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}")
            positions = torch.arange(T, device=tokens.device)[None, :]  # (1, T)
        if (self.cpu_ops is not None and tokens.device.type == "cpu" and backend == "torch"
                and not torch.is_grad_enabled() and self.embed.weight.dtype == torch.float32):
            x = self._forward_cpu(tokens, positions, kv_cache, batch, output_index)
        else:
            x = self.embed(tokens)
            rope = None
            if self.config.positions == "learned":
                x = x + self.pos_embed(positions)
            else:
                rope = (self.rope_cos[positions][:, :, None, :], self.rope_sin[positions][:, :, None, :])
            if self.autocast_residual and torch.is_autocast_enabled(tokens.device.type):
                x = x.to(torch.get_autocast_dtype(tokens.device.type))
            # self-attention without a cache on a CPU: the native kernels, where `use_native_kernels` set them
            native = self.native_kernels and batch is None and backend == "torch" and tokens.device.type == "cpu"
            for i, block in enumerate(self.blocks):
                layer_cache = (kv_cache.k[i], kv_cache.v[i]) if batch is not None else None
                x = block(x, rope, layer_cache, batch, "native" if native else backend)
            if output_index is not None:
                x = x[torch.arange(B, device=x.device), output_index]  # (B, d)
            x = self.norm(x)
        if targets is not None:
            return self.loss(x, targets, backend)
        if return_hidden:
            return x
        return self.lm_head(x)

    def _forward_cpu(self, tokens: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache | None,
                     batch: CacheBatch | None, output_index: torch.Tensor | None) -> torch.Tensor:
        """`forward`'s blocks and final norm on a CPU, in fp32 without autograd (prompts, scoring): the same
        arithmetic with each elementwise step one pass of `cpu_ops` (model/native) instead of several torch
        ops: residual add + norm, rotary embedding of queries and keys in place, SwiGLU, and attention (the
        query heads of a kv head scored in one product, only the keys each block of queries sees; without it
        in the module, `causal_attention` / `cached_attention`). The products stay `nn.Linear` calls (oneDNN,
        or AMX tiles: `cpu_packing.amx_linears`). Returns the final-norm hidden states, (B, T, d), or (B, d) at
        `output_index`."""
        ops, c = self.cpu_ops, self.config
        B, T = tokens.shape
        H, Hkv, D = c.n_head, c.n_kv_head, c.dim_per_head
        rms = c.norm == "rmsnorm"
        none = torch.empty(0)

        def norm(module, h, residual):  # h (N, d) += residual in place (the new residual); returns norm(h)
            shift = getattr(module, "bias", None)
            return ops.add_norm(h, residual, module.weight, none if shift is None else shift, rms, module.eps)

        # attention in one native call where the module has it: query t of row b sees keys up to its position
        attend = getattr(ops, "causal_attention", None)
        if batch is None:
            starts, lengths = torch.zeros(B, dtype=torch.long), torch.full((B,), T, dtype=torch.long)
        else:
            starts, lengths = batch.positions[:, 0].to(torch.long), batch.lengths.to(torch.long)
        positions = positions.expand(B, T).reshape(B * T)  # (N,) a copy: positions (1, T) broadcast over rows
        h, residual = self.embed(tokens).view(B * T, -1), none
        if c.positions == "learned":
            residual = self.pos_embed(positions)  # the first norm adds it
        for i, block in enumerate(self.blocks):
            x = norm(block.norm1, h, residual)
            residual = h
            qkv = block.attn.norm_qk_(block.attn.qkv(x))  # (N, (H + 2 Hkv) D)
            if c.positions == "rope":
                ops.rope_(qkv, positions, self.rope_cos, self.rope_sin, H + Hkv, D)
            qkv = qkv.view(B, T, H + 2 * Hkv, D)
            q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
            if attend is not None:  # (B, T, H, D) out: the projection's input is a view
                if batch is not None:  # the row's cached keys and values, in q's (B, L, Hkv, D) layout
                    k_cache, v_cache = kv_cache.k[i], kv_cache.v[i]
                    store_keys(k, v, k_cache, v_cache, batch.write_blocks, batch.write_offsets)
                    k, v = (x.transpose(1, 2) for x in cached_keys(k_cache, v_cache, batch.block_table, batch.kv_len,
                                                                   batch.contiguous_from, q.dtype))
                y = attend(q, k, v, starts, lengths, D ** -0.5).view(B * T, H * D)
            elif batch is None:
                y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "torch")
            else:
                y = cached_attention(q.transpose(1, 2), k, v, kv_cache.k[i], kv_cache.v[i], batch, "torch")
            h = block.attn.proj(y if attend is not None else y.transpose(1, 2).reshape(B * T, H * D))
            x = norm(block.norm2, h, residual)
            residual = h
            up = block.mlp.up(x)
            h = block.mlp.down(ops.silu_mul(up) if c.mlp == "swiglu" else F.gelu(up, approximate="tanh"))
        if output_index is not None:
            rows = torch.arange(B) * T + output_index.to(torch.long)  # (B,)
            return norm(self.norm, h[rows], residual[rows])  # (B, d)
        return norm(self.norm, h, residual).view(B, T, -1)

    def _forward_fused(self, tokens: torch.Tensor, kv_cache: KVCache, batch: CacheBatch, backend: str) -> torch.Tensor:
        """The cached (serving) forward on the GPU, in fewer kernels: tokens (B, T) -> final-norm hidden (B, T, d).

        The residual stream is carried beside the block outputs, so each residual add and the norm after
        it are one kernel (`kernels.norm`); rotary embedding and the KV-cache write are one
        (`kernels.rope`), and so is SwiGLU (`kernels.activation`). A decode step is launch-bound at
        small batch, replayed from a CUDA graph or not: this cuts its kernels per layer from ~35 to ~10.
        The same arithmetic as `forward`, up to fp32 rounding inside the fused kernels."""
        from kernels.norm import add_norm

        c = self.config
        rms = c.norm == "rmsnorm"
        if (self.fused_gemv and rms and c.mlp == "swiglu" and c.positions == "rope" and not c.bias
                and not c.has_attention_bias):
            from kernels.gemv import FMA_MAX_ROWS

            if tokens.numel() <= FMA_MAX_ROWS:  # above, only its tensor-core configs: slower than cuBLAS
                return self._forward_gemv(tokens, kv_cache, batch, backend)

        def norm(module, h, residual):
            return add_norm(h, residual, module.weight, getattr(module, "bias", None), module.eps, rms)

        h, residual = self.embed(tokens), None
        if c.positions == "learned":
            residual = self.pos_embed(batch.positions)  # the first norm adds it
            rope_tables = (None, None)
        else:
            rope_tables = (self.rope_cos, self.rope_sin)
        for i, block in enumerate(self.blocks):
            x, residual = norm(block.norm1, h, residual)
            h = block.attn.forward_fused(block.attn.qkv(x), rope_tables, kv_cache, i, batch, backend)
            x, residual = norm(block.norm2, h, residual)
            h = block.mlp.forward_fused(x)
        return norm(self.norm, h, residual)[0]

    def _forward_gemv(self, tokens: torch.Tensor, kv_cache: KVCache, batch: CacheBatch, backend: str) -> torch.Tensor:
        """`_forward_fused` for a decode step of a Llama-style model (at most `kernels.gemv.FMA_MAX_ROWS` tokens):
        each residual add + RMSNorm runs inside the qkv or gate/up product that consumes it, and SwiGLU
        inside the down product (`kernels.gemv`): three kernels fewer per layer than `_forward_fused` (four
        where cuBLAS splits the down product's K and reduces the parts in a kernel of its own). The output
        projection is a `kernels.gemv` product too, so every product of the layer is tuned alike."""
        from kernels.gemv import gemv, rmsnorm_gemv, silu_mul_gemv
        from kernels.norm import add_norm

        B, T = tokens.shape
        h, residual = self.embed(tokens).view(B * T, -1), None
        for i, block in enumerate(self.blocks):
            qkv, residual = rmsnorm_gemv(h, residual, block.norm1.weight, block.attn.qkv.weight, block.norm1.eps)
            y = block.attn.attend_fused(qkv.view(B, T, -1), (self.rope_cos, self.rope_sin), kv_cache, i, batch,
                                        backend)  # (B, T, H * D)
            h = gemv(y.flatten(0, 1), block.attn.proj.weight)
            gate_up, residual = rmsnorm_gemv(h, residual, block.norm2.weight, block.mlp.up.weight, block.norm2.eps)
            h = silu_mul_gemv(gate_up, block.mlp.down.weight)
        return add_norm(h, residual, self.norm.weight, None, self.norm.eps, True)[0].view(B, T, -1)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, backend: str) -> torch.Tensor:
        if self.loss_impl == "chunked" and (backend == "triton" or hidden.device.type == "cpu"):
            from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_torch

            # LM head + cross-entropy in chunks of rows: the (B*T, V) logits never exist at once (on the CPU
            # the same algorithm in torch ops, whose cache-sized chunks also make it faster). The op
            # runs its matmuls in its inputs' dtype, so under autocast they are cast as the LM head's
            # would be (fp32 master weights would otherwise run the biggest matmuls in fp32).
            hidden, weight = hidden.flatten(0, -2), self.lm_head.weight
            if torch.is_autocast_enabled(hidden.device.type):
                dtype = torch.get_autocast_dtype(hidden.device.type)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
            if backend == "triton":
                return linear_cross_entropy(hidden, weight, targets.flatten(), ignore_index=-100)  # (fp32)
            rows = native_loss_rows if self.native_kernels and hidden.device.type == "cpu" else None
            return linear_cross_entropy_torch(hidden, weight, targets.flatten(), ignore_index=-100, rows=rows)
        logits = self.lm_head(hidden).flatten(0, -2)
        if backend == "triton":
            from kernels.cross_entropy import cross_entropy

            return cross_entropy(logits, targets.flatten(), ignore_index=-100).float()
        return F.cross_entropy(logits.float(), targets.flatten(), ignore_index=-100)
