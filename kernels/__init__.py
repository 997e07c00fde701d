"""Kiln kernels package.

Kiln's own Triton kernels for the GPU hot paths, one concept per module, each with a
plain-torch ``*_reference`` beside it that is also the CPU path:

* ``kernels.attention``      flash attention forward + backward, dense and varlen (prefill, training)
* ``kernels.decode``         split-KV (flash-decoding) attention over the paged KV cache
* ``kernels.softmax``        row softmax with temperature for sampling, any row length
* ``kernels.cross_entropy``  fused cross-entropy / token logprobs with backward, chunked linear+CE
* ``kernels.norm``           residual add + RMSNorm / LayerNorm in one kernel (inference)
* ``kernels.rope``           rotary embedding + paged KV-cache write in one kernel (inference)
* ``kernels.activation``     SwiGLU's silu(gate) * up in one kernel (inference)

Every module has ``available(device)``: True for CUDA tensors when Triton >= 3.6 is
installed, or for CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (the CI path). Importing this package, or any module in it, never imports
triton: kernels are jitted on first use (``kernels._utils``). Benchmarks live in bench/.
"""
