"""Weight-only int8 quantization for serving on the CPU (`--quantization int8`).

A decode step at small batch reads every matrix of the model once per token, so on a CPU its
speed is the memory bandwidth over the bytes those matrices take. `quantize_model(model)`
replaces each linear layer a step reads (attention q/k/v and output, MLP up and down, the LM
head) by an `Int8Linear`: int8 weights with one fp32 scale per output row (symmetric,
scale = max |row| / 127), 1 byte per weight against fp32's 4 and bf16's 2. Embeddings, norms
and biases stay fp32, and so does every activation: a product is (x . q_row) * scale in fp32,
which equals x times the dequantized row to fp32 rounding.

The int8 matrices are stored in the tiled layout the native decode step reads
(`pack_tiles`), so the step uses them without a copy. Other paths (prefill, scoring, batches
past the native step, a machine without a compiler) multiply by the dequantized fp32 matrix,
rebuilt on each call: right, but slower per call than an fp32 model's prepacked weights.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import QUANTIZATIONS

TILE = 32  # output rows per weight tile of the native step (kTile in model/native/decode_step.cpp)

log = logging.getLogger("kiln.quantize")


def pack_tiles(weight: torch.Tensor, tile: int = TILE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(O, I) -> (ceil(O / tile), I, tile) in `dtype`: tiles of `tile` output rows, each transposed
    and contiguous, the last zero-padded; the layout the native step's matrix-vector loops read."""
    out_features, in_features = weight.shape
    tiles = -(-out_features // tile)
    padded = torch.zeros(tiles * tile, in_features, dtype=dtype)
    padded[:out_features] = weight.detach()
    return padded.view(tiles, tile, in_features).transpose(1, 2).contiguous()


def unpack_tiles(tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """The inverse of `pack_tiles`: (T, I, tile) -> (out_features, I), same dtype."""
    n_tiles, in_features, tile = tiles.shape
    return tiles.transpose(1, 2).reshape(n_tiles * tile, in_features)[:out_features]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, I) float -> (int8 (O, I), fp32 scales (O,)) with weight ~= q * scale[:, None].

    Symmetric per output row: the row's largest magnitude maps to 127; an all-zero row gets
    scale 1 (its q is all zeros either way)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (one fp32 scale per output row), fp32 in and out.

    `tiles` (ceil(O / 32), I, 32) int8 is the weight in the native step's layout, `scale` (O,)
    fp32, `bias` (O,) fp32 or None. `weight` is the dequantized (O, I) fp32 matrix, rebuilt on
    each access."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("tiles", pack_tiles(q, dtype=torch.int8))
        self.register_buffer("scale", scale.contiguous())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def weight(self) -> torch.Tensor:
        return unpack_tiles(self.tiles, self.out_features).float().mul_(self.scale[:, None])  # one fp32 buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_model(model: nn.Module, method: str) -> int:
    """Replace the model's linear layers by `Int8Linear`s in place; returns the bytes saved.

    Needs an fp32 model on the CPU (activations stay fp32). A tied LM head gets its own int8
    copy; the embedding it shares stays fp32 for the token lookup."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; allowed: {', '.join(QUANTIZATIONS)}")
    weight = model.embed.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        dtype = str(weight.dtype).removeprefix("torch.")
        raise ValueError(f"int8 quantization runs fp32 models on the CPU, not {dtype} on {weight.device.type} "
                         "(use --device cpu and --dtype fp32 or auto)")
    tied = getattr(model.lm_head, "weight", None) is weight
    before = _tensor_bytes(model)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv = Int8Linear(block.attn.qkv)
            block.attn.proj = Int8Linear(block.attn.proj)
            block.mlp.up = Int8Linear(block.mlp.up)
            block.mlp.down = Int8Linear(block.mlp.down)
        model.lm_head = Int8Linear(model.lm_head)
    after = _tensor_bytes(model)
    log.info("int8 weights: %.1f MB of tensors -> %.1f MB%s", before / 1e6, after / 1e6,
             " (the tied embedding stays fp32 for lookups)" if tied else "")
    return before - after


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, a tensor shared by two names counted once."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def is_quantized(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lm_head", None), Int8Linear)
