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
  are and apply the norms as modules;
- one flat loop over pre-extracted weights: no module calls, hooks or attribute lookups.

The plain path stays the reference: tests assert both give the same greedy tokens and
log-probabilities within 1e-4. Used for the torch backend only (on CUDA the Triton decode
kernel path runs through the model as usual).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import CacheBatch, KVCache
from .attention import cached_attention
from .transformer import Transformer, apply_rope


# Folding copies the matrices that read a norm (qkv, MLP up, LM head). Worth it for small
# models, where every op counts; for large ones the copies would double the memory, so the
# plan keeps the original weights and applies the gains as one more op.
FOLD_LIMIT_BYTES = 256 * 2**20


@dataclass
class _Layer:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    proj_w: torch.Tensor
    proj_b: torch.Tensor | None
    up_w: torch.Tensor
    up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    norm1: torch.nn.Module | None  # None when folded into qkv_w
    norm2: torch.nn.Module | None  # None when folded into up_w


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
        self.folded = weight_bytes <= FOLD_LIMIT_BYTES

        def reading(norm, linear):  # (weight, bias, norm to apply first or None)
            if self.folded:
                return (*_fold(norm, linear.weight, linear.bias), None)
            return linear.weight, linear.bias, norm

        with torch.no_grad():
            self.layers = []
            for block in model.blocks:
                qkv_w, qkv_b, norm1 = reading(block.norm1, block.attn.qkv)
                up_w, up_b, norm2 = reading(block.norm2, block.mlp.up)
                self.layers.append(_Layer(qkv_w, qkv_b, block.attn.proj.weight, block.attn.proj.bias,
                                          up_w, up_b, block.mlp.down.weight, block.mlp.down.bias, norm1, norm2))
            self.head_w, self.head_b, self.final_norm = reading(model.norm, model.lm_head)
        self._head_packs: dict[int, torch.Tensor] = {}  # batch size -> oneDNN-packed head (pack_head)

    def pack_head(self, batch_sizes: list[int]) -> None:
        """Prepack the LM head for oneDNN at the given batch sizes (CPU builds with mkldnn).

        The head is the biggest matrix of a decode step and plain GEMV runs it on one core;
        oneDNN's prepacked path is about 2x faster at batch 1 and 3x at batch 8 here. Each
        pack is a copy of the head, so only small (folded) models get them. A pack that does
        not reproduce F.linear to fp32 rounding is dropped.
        """
        if not (self.folded and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return
        probe = torch.randn(max(batch_sizes), self.head_w.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = F.linear(probe, self.head_w, self.head_b)
            for size in sorted(set(batch_sizes)):
                try:
                    packed = torch.ops.mkldnn._reorder_linear_weight(self.head_w, size)
                    got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.head_b, "none", [], "")
                except (RuntimeError, AttributeError):
                    return
                if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                    return
                self._head_packs[size] = packed

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, d) -> logits (B, V), through the pack made for the nearest batch size at or above B."""
        fits = [size for size in self._head_packs if size >= h.shape[0]]
        if not fits:
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

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, kv_cache: KVCache, batch: CacheBatch) -> torch.Tensor:
        """tokens (B, 1) -> logits (B, V); writes each row's keys/values into its slot."""
        model = self.model
        B = tokens.shape[0]
        H, Hkv, D = self.H, self.Hkv, self.D
        positions = batch.positions  # (B, 1)
        x = F.embedding(tokens, model.embed.weight)  # (B, 1, d)
        if self.rms:
            cos = model.rope_cos[positions][:, :, None, :]  # (B, 1, 1, D)
            sin = model.rope_sin[positions][:, :, None, :]
        else:
            x = x + F.embedding(positions, model.pos_embed.weight)
        for i, layer in enumerate(self.layers):
            qkv = F.linear(self._norm(x, layer.norm1), layer.qkv_w, layer.qkv_b)  # (B, 1, (H + 2Hkv) D)
            qk = qkv[..., : (H + Hkv) * D].view(B, 1, H + Hkv, D)
            if self.rms:
                qk = apply_rope(qk, cos, sin)
            v = qkv[..., (H + Hkv) * D:].view(B, 1, Hkv, D)
            y = cached_attention(qk[:, :, :H].transpose(1, 2), qk[:, :, H:], v, kv_cache.k[i], kv_cache.v[i],
                                 batch, "torch")  # (B, H, 1, D)
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, H * D), layer.proj_w, layer.proj_b)
            h = F.linear(self._norm(x, layer.norm2), layer.up_w, layer.up_b)
            if self.swiglu:
                h = F.silu(h[..., : self.d_ff]) * h[..., self.d_ff:]
            else:
                h = F.gelu(h, approximate="tanh")
            x = x + F.linear(h, layer.down_w, layer.down_b)
        return self._head(self._norm(x[:, 0], self.final_norm))  # (B, V)
