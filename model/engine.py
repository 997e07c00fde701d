"""The engine: continuous batching over a paged KV cache, and scoring.

It owns no threads: a caller (the CLI, or the server's worker thread) adds requests and
calls `step()`. A request holds a slot (one of max_batch_size running rows) and the KV
blocks its tokens need (`model.kv_cache`). Each step:

1. grows every decoding sequence by one position; when the block pool is out, the most
   recently admitted request is preempted: its blocks are freed and it goes back to the
   front of the queue, to be recomputed (prompt + tokens so far) when it is readmitted;
2. admits waiting requests while slots and blocks allow, first looking their prompt's
   full blocks up in the prefix cache: a hit shares the cached blocks and skips their
   prefill (echo requests, which need every prompt position's logprobs, skip the lookup);
3. prefills up to max_prefill_tokens prompt tokens, whole prompts or chunks of long ones,
   in forwards of similar lengths; a request whose prompt is complete samples its first
   token;
4. runs one batched decode forward over the sequences that were already generating (on
   CUDA replayed from a captured graph, `model.cuda_graphs`). On the CPU, greedy sequences
   may add rows for draft tokens copied from earlier in their text (`model.speculative`):
   the step then emits every draft its argmaxes confirm, plus one token.

Sampling stays on the device. With async scheduling (on by default on CUDA) the host reads
a step's ids one step late: each sampled id also goes into its slot of a device tensor, where
the next decode step reads its input, and `step()` queues step k+1 on the GPU first and only
then waits for step k's ids (copied into pinned memory) to detokenize them, check stops and
emit outputs, so that host work overlaps the GPU's. Until then a sampled id is a PENDING
placeholder in `output_ids`; the only cost is that a sequence that hits a stop at step k has
already been queued for step k+1, whose result is dropped. Steps that must preempt first
resolve everything outstanding, so preempted sequences always know their tokens. Without it
(the CPU default, where nothing would overlap) every step reads its ids back at its end.

Finished or aborted requests give their blocks back at once; full blocks stay findable
in the prefix cache until the pool needs them.

`score()` computes per-token log-probabilities of whole texts (sliding windows past the
context) without the cache; it is what perplexity, `kiln ppl` and the server use.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .attention import resolve_backend
from .cpu_packing import (AMX_PARTS, amx_linears, bf16_copy, pack_linears, released, released_bytes,
                          resolve_prefill_dtype, trim_heap)
from .cuda_graphs import GraphedDecode, describe_failure
from .fast_decode import DecodePlan
from .kv_cache import NULL_BLOCK, KVCache, block_hashes, default_num_blocks, resolve_kv_cache_dtype
from .requests import PENDING, InvalidRequest, Request, SamplingParams, StepOutput, TokenLogprob
from .sampling import GREEDY_BELOW, SamplingBatch, sample
from .scoring import ScoreResult, ScoreTask, chunked_logprobs
from .speculative import DEFAULT_SPECULATIVE_TOKENS, MAX_SPECULATIVE_TOKENS, PromptLookup
from .text_stream import TextStream
from .tokenizer import Tokenizer
from .transfer import HostCopy, to_device, upload
from .transformer import Transformer

__all__ = ["Engine", "InvalidRequest", "PENDING", "Request", "SamplingParams", "StepOutput", "TokenLogprob",
           "prefill_groups", "default_num_blocks"]

@dataclass
class _Sampled:
    """One sampling call's ids (and logprobs) on their way to the host."""

    rows: list[tuple[Request, int]]  # per row: the request and the index of its id in output_ids
    copy: HostCopy  # token ids, chosen logprobs, top ids, top logprobs
    prompt_lps: list[list[TokenLogprob] | None] | None = None  # per row, echo's prompt logprobs


def prefill_groups(lengths: list[int], max_padding: float = 0.5, max_tokens: int = 8192) -> list[list[int]]:
    """Indices of prompts to prefill together: similar lengths, so right-padding wastes at most
    `max_padding` of each forward, and at most `max_tokens` padded tokens per forward."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            padded = lengths[i] * (len(group) + 1)  # sorted: the newcomer is the longest
            real = sum(lengths[j] for j in group) + lengths[i]
            if padded <= max_tokens and padded - real <= max_padding * padded:
                group.append(i)
                continue
        groups.append([i])
    return groups


DEFAULT_BLOCK_SIZE = 16


class Engine:
    """Continuous batching over a paged KV cache with prefix caching, chunked prefill and preemption.

    - max_batch_size: sequences running at once (decoded together).
    - block_size / num_blocks: the KV pool (num_blocks None: sized from memory, see
      `kv_cache.default_num_blocks`); enable_prefix_caching: reuse the cached blocks of shared prefixes.
    - max_prefill_tokens: prompt tokens computed per step; longer prompts are prefilled in
      chunks between decode steps so running streams keep a steady pace.
    - prefill_dtype: "auto", "fp32" or "bf16", what an fp32 model on the CPU (int8-quantized or not)
      computes its prompt forwards and scoring in (decode steps stay as they are). "bf16" runs them
      through a bf16 copy of the model (`cpu_packing.bf16_copy`, made once here), 2-3.5x faster on CPUs
      with AMX, prompt logprobs within ~1e-2 of fp32's; "auto" (fp32) keeps prompts in the arithmetic
      the decode steps use (`cpu_packing.resolve_prefill_dtype` says why). Other models compute in their
      own dtype; asking them for another is an error.
    - speculative_tokens: prompt-lookup speculation (`model.speculative`) for greedy requests where decode
      steps run the lean CPU step (native or torch) without async scheduling: a step verifies at most this many
      draft tokens (copied from earlier in the sequence) beside its sequences, 1 + speculative_tokens rows
      in all, and emits each sequence's accepted drafts plus one token, the tokens greedy decoding gives.
      None: DEFAULT_SPECULATIVE_TOKENS; 0: off.
    - kv_cache_dtype: "auto" (the model's dtype), "fp32" or "bf16", what the KV pool holds
      (`kv_cache.resolve_kv_cache_dtype`): on the CPU, "bf16" halves the pool and the cache reads of long
      decode steps; keys and values are rounded to bf16 as they are stored, so outputs move slightly.
    - release_weights: for serving a large (unfolded) fp32 model on the CPU: keep each linear layer's matrix only
      as its oneDNN pack, dropping the fp32 original (`cpu_packing.pack_linears`), which saves the memory of
      all the matrices (the native step keeps its own bf16 or fp32 tiles). The model then runs its linear
      layers only without gradients, and no other engine can be built on it. No effect on other models, or
      with compile.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 8,
                 max_seq_len: int | None = None, fast_decode: bool = True, block_size: int = DEFAULT_BLOCK_SIZE,
                 num_blocks: int | None = None, enable_prefix_caching: bool = True,
                 max_prefill_tokens: int | None = None, gpu_memory_fraction: float = 0.9,
                 cuda_graphs: bool = True, compile: bool = False, native: bool | None = None,
                 async_scheduling: bool | None = None, prefill_dtype: str = "auto",
                 speculative_tokens: int | None = None, kv_cache_dtype: str = "auto",
                 release_weights: bool = False):
        if released(model):
            raise ValueError("this model's fp32 matrices were released to another engine (release_weights=True); "
                             "load the model again to build a new engine on it")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0.0 < gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.prefill_dtype = resolve_prefill_dtype(model, prefill_dtype)
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype, self.device)
        # prompt forwards and scoring run this model: this one, or its bf16 copy
        self.prefill_model = model if self.prefill_dtype == self.dtype else bf16_copy(model)
        if max_seq_len is not None and not 2 <= max_seq_len <= self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} is out of range: this model's context length is "
                             f"{self.config.max_seq_len} tokens (max_seq_len in its config.json); allowed: 2.."
                             f"{self.config.max_seq_len}")
        self.max_seq_len = max_seq_len or self.config.max_seq_len
        self.max_batch_size = max_batch_size
        if max_prefill_tokens is None:
            max_prefill_tokens = 2048 if self.device.type == "cuda" else 512
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if speculative_tokens is None:
            speculative_tokens = DEFAULT_SPECULATIVE_TOKENS
        if not 0 <= speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}] (0: off), "
                             f"got {speculative_tokens}")
        self.speculative_tokens = speculative_tokens
        self.num_draft_tokens = 0  # drafts verified so far, and how many of them were right
        self.num_accepted_tokens = 0
        self.max_prefill_tokens = max_prefill_tokens
        if num_blocks is None:
            reserve = 4 * max_prefill_tokens * (4 * self.config.d_model + 2 * self.config.d_ff) * 4 \
                + 2 * max_batch_size * self.config.vocab_size * 4 + 256 * 2**20
            num_blocks = default_num_blocks(self.config, self.device, self.kv_cache_dtype, block_size, self.max_seq_len,
                                            max_batch_size, gpu_memory_fraction, reserve)
        self.cache = KVCache(self.config, num_blocks, block_size, self.max_seq_len, self.device, self.kv_cache_dtype,
                             enable_prefix_caching)
        self.pool = self.cache.pool
        self.block_size = block_size
        self.vocab_limit = min(tokenizer.n_vocab, self.config.vocab_size)
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else self.config.eos_token_id
        # every id that ends a sequence: the tokenizer's EOS and the ones the model's config adds (a chat
        # model's end of turn); ignore_eos and min_tokens apply to all of them
        self.eos_ids = frozenset(i for i in (self.eos_id, self.config.eos_token_id, *self.config.extra_eos_token_ids)
                                 if i is not None and 0 <= i < self.vocab_limit)
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # admission order: the last is preempted first
        self._free_slots = list(range(max_batch_size))  # a min-heap
        # each slot's block table, kept up to date a block at a time (the decode step reads rows of it)
        self._block_tables = np.full((max_batch_size, self.cache.max_blocks_per_seq), NULL_BLOCK, dtype=np.int64)
        self._ids = itertools.count()
        self._counts: torch.Tensor | None = None  # (max_batch_size, V) generated-id counts, for penalties
        self.num_preemptions = 0
        # each slot's last sampled id, on the device: the next decode step's input
        self._last_tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        # read sampled ids back one step late (None: on CUDA, where it overlaps host and GPU work)
        self._async = self.device.type == "cuda" if async_scheduling is None else bool(async_scheduling)
        self._pending: list[_Sampled] = []
        self.amx_linears = 0  # linear layers whose fp32 prompt products run on AMX tiles (`_enable_native`)
        self.released_bytes = 0  # bytes of fp32 matrices kept only as oneDNN packs (release_weights)
        self._setup_decode(fast_decode, native, compile, cuda_graphs, release_weights)

    def _setup_decode(self, fast_decode: bool, native: bool | None, compile: bool, cuda_graphs: bool,
                      release_weights: bool) -> None:
        """Pick the decode step: on the CPU the lean plan (folded norms, no module calls), through the
        native C++ step when it is built, or torch.compile'd on request; on CUDA the model's forward with
        the Triton kernels, replayed from CUDA graphs; else the plain forward."""
        model = self.model
        backend = resolve_backend(model.attn_backend, self.device, self.config.dim_per_head)
        use_plan = fast_decode and backend == "torch" and DecodePlan.supports(model)
        self._decode_plan = plan = DecodePlan(model) if use_plan else None
        # prefill and scoring matrices through prepacked oneDNN weights, unless the bf16 copy runs those; a
        # large model's torch decode step reads the packs too (`DecodePlan._use_packs`)
        if self.device.type == "cpu" and self.dtype == torch.float32 and (
                self.prefill_model is model or (plan is not None and not plan.folded)):
            release = release_weights and plan is not None and not plan.folded and not compile
            if release:
                plan.supports_native()  # (checked on the fp32 originals while they are here: the answer is kept)
                plan.read_modules()  # (drops the plan's references to the matrices)
            pack_linears(model, release=release)
            self.released_bytes = released_bytes(model)
        if plan is not None:
            plan.pack_head([1, self.max_batch_size])
        # native: None = use it if it is already built, True = build it now if needed, False = never
        if native is not False and plan is not None and plan.supports_native():
            from . import native as native_step

            module = native_step.load(build=bool(native))
            if module is not None:
                self._enable_native(module)
        self.compile_seconds: float | None = None  # set when the decode step was compiled
        self.compile_error: str | None = None
        graphed = cuda_graphs and backend == "triton" and self.device.type == "cuda"
        if compile and not graphed:  # (GraphedDecode compiles the CUDA step itself, below)
            if plan is None:
                self.compile_error = ("compile applies to the CPU decode step (torch attention backend) and to "
                                      "the CUDA-graph decode step (triton backend)")
            elif plan.native and self.max_batch_size <= plan.native_max_batch:
                self.compile_error = "not needed: the native decode step runs every batch size up to max_batch_size"
            else:
                try:
                    self.compile_seconds = plan.compile(self.cache, self.max_batch_size)
                except Exception as e:  # noqa: BLE001 -- no compiler, an inductor bug: serve eagerly
                    self.compile_error = describe_failure(e)
        self.attn_backend = backend  # what attention runs on: "triton" or "torch"
        self._decode_mask = backend != "triton"  # the Triton decode kernel reads lengths, not a mask
        self._graphs: GraphedDecode | None = None
        if graphed:
            graphs = GraphedDecode(model, self.cache, self.max_batch_size, compile=compile)
            self._graphs = graphs if graphs.enabled else None
            self.compile_seconds, self.compile_error = graphs.compile_seconds, graphs.compile_error

    # ---- requests -------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        params.validate()
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty: at least one token is needed", "prompt")
        for ids, what, param in ((prompt_ids, "token id", "prompt"),
                                 (params.stop_token_ids, "stop token id", "stop_token_ids"),
                                 ([i for i, _ in params.logit_bias], "logit_bias token id", "logit_bias")):
            bad = next((i for i in ids if not 0 <= i < self.vocab_limit), None)
            if bad is not None:
                raise InvalidRequest(f"{what} {bad} is out of range [0, {self.vocab_limit})", param)
        # the last generated id is never fed back, so P prompt + M new ids need P + M - 1 cache positions
        if len(prompt_ids) > self.max_seq_len:  # (max_tokens may be a server default: not quoted)
            raise InvalidRequest(f"this model's maximum context length is {self.max_seq_len} tokens, but the "
                                 f"prompt has {len(prompt_ids)} tokens", "prompt")
        if len(prompt_ids) + params.max_tokens > self.max_seq_len + 1:
            raise InvalidRequest(f"this model's maximum context length is {self.max_seq_len} tokens, but "
                                 f"{len(prompt_ids)} prompt tokens + {params.max_tokens} max_tokens were requested "
                                 f"(prompt + max_tokens may be at most {self.max_seq_len + 1}: the last token "
                                 "generated needs no position)", "max_tokens")
        request = Request(next(self._ids), list(prompt_ids), params,
                          stream=TextStream(self.tokenizer, params.stop, context_ids=prompt_ids[-4:]))
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        if request.finish_reason is None:
            request.finish_reason = "abort"
        request.drop_pending()  # its ids still in flight are dropped when they arrive
        self._release(request)

    def _release(self, request: Request) -> None:
        """Give back the request's blocks and its slot (finish, abort or preemption)."""
        if request in self.running:
            self.running.remove(request)
        if request.blocks:
            self.pool.release(request.blocks)
            request.blocks = []
        request.num_computed = 0
        if request.slot is not None:
            self._block_tables[request.slot] = NULL_BLOCK
            heapq.heappush(self._free_slots, request.slot)
            request.slot = None

    @property
    def async_scheduling(self) -> bool:
        return self._async

    @async_scheduling.setter
    def async_scheduling(self, value: bool) -> None:
        if self.has_work:
            raise RuntimeError("async scheduling can only be switched while the engine is idle")
        self._async = bool(value)

    @property
    def has_work(self) -> bool:
        """Requests waiting or running. A request with ids in flight is running until they are read
        back; ids in flight for aborted requests are dropped by the next step, whenever it comes."""
        return bool(self.waiting or self.running)

    @property
    def native_decode(self) -> bool:
        """Decode steps run through the native C++ step (model/native)."""
        return self._decode_plan is not None and self._decode_plan.native

    @property
    def decode_path(self) -> str:
        """How decode steps run, for logs: CUDA graphs, native (with its matrices' dtype), compiled or eager."""
        if self.uses_cuda_graphs:
            return "CUDA graphs" + (" (compiled)" if self.compile_seconds is not None else "")
        if self.native_decode:
            plan = self._decode_plan
            rows = "" if plan.native_max_batch >= self.max_batch_size else f", up to {plan.native_max_batch} rows"
            return f"native ({str(plan.native_dtype).removeprefix('torch.')} matrices{rows})"
        return "compiled" if self.compile_seconds is not None else "eager"

    def build_native_in_background(self) -> bool:
        """Build the native decode step on a daemon thread and switch to it when it is ready;
        False when it does not apply (not the CPU torch path, not fp32, disabled) or is already on."""
        from . import native as native_step

        plan = self._decode_plan
        if plan is None or plan.native or not plan.supports_native() or native_step.disabled():
            return False
        native_step.load_in_background(self._enable_native)
        return True

    def _enable_native(self, module) -> None:
        """Decode steps through the native module's step, and the CPU forward (prompts, scoring) through its
        fused elementwise steps (`Transformer.cpu_ops`) and, for fp32 prompts on an AMX CPU, its products of
        bf16-exact weights on the tiles (`cpu_packing.amx_linears`)."""
        self._decode_plan.enable_native(module)
        self.model.cpu_ops = module
        if self.prefill_model is self.model and self.dtype == torch.float32:
            self.amx_linears = amx_linears(self.model, module)
        if self.released_bytes:
            trim_heap()  # (the matrices rebuilt from the packs for the native step's copy are gone again)

    @property
    def prefill_math(self) -> str:
        """What prompt forwards and scoring compute in, for logs: the prefill dtype, and how fp32 products run."""
        name = str(self.prefill_dtype).removeprefix("torch.")
        if self.amx_linears:
            name += f", products as {AMX_PARTS} bf16 parts on AMX tiles"
        return name

    @property
    def speculating(self) -> bool:
        """Decode steps may verify prompt-lookup drafts for greedy requests: on (speculative_tokens > 0), the
        lean CPU step runs them (native or torch: any rows at any positions), and ids are read back every
        step (no async scheduling)."""
        return self.speculative_tokens > 0 and self._decode_plan is not None and not self._async

    @property
    def uses_cuda_graphs(self) -> bool:
        return self._graphs is not None

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    # ---- scheduling -----------------------------------------------------------------
    def _preempt(self, keep: Request) -> Request | None:
        """Free the blocks of the most recently admitted running request other than `keep`;
        it goes back to the front of the queue and is recomputed (prompt + output) later."""
        victims = [r for r in self.running if r is not keep]
        if not victims:
            return None
        victim = victims[-1]
        self._requeue(victim)
        return victim

    def _requeue(self, request: Request) -> None:
        self._release(request)
        if not request.prompt_lps_done:
            request.prompt_lps = None  # rebuilt from the start when it is prefilled again
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, request)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make the request's blocks cover `num_tokens` positions, preempting others if the pool is
        out; False if even that cannot (the request itself is then preempted by the caller)."""
        while len(request.blocks) < self.cache.blocks_needed(num_tokens):
            if self.pool.num_free == 0 and self._preempt(keep=request) is None:
                return False
            if self.pool.num_free > 0:
                request.blocks.append(self.pool.allocate())
                self._block_tables[request.slot, len(request.blocks) - 1] = request.blocks[-1]
        return True

    def _admit(self, request: Request) -> bool:
        """Take a slot and blocks for the whole known sequence (cached prefix blocks shared)."""
        n = request.num_tokens
        hits: list[int] = []
        # echo needs every prompt position's logits, so it computes them all and looks nothing up
        looked_up = self.pool.enable_prefix_caching and not request.wants_prompt_logprobs
        if looked_up:
            # at least the last token is computed: its logits give the next token
            usable = (n - 1) // self.block_size
            hits = self.pool.lookup(self._block_hashes(request, usable))
        # headroom: each running sequence may need a new block before this one finishes its prefill,
        # and admitting work that is preempted at once would only waste its prefill
        headroom = len(self.running)
        if self.cache.blocks_needed(n) - len(hits) + headroom > self.pool.num_free:
            self.pool.release(hits)
            return False
        if looked_up and request.num_preemptions == 0:  # count each prompt once
            self.pool.queried_tokens += len(request.prompt_ids)
            self.pool.hit_tokens += len(hits) * self.block_size
        request.blocks = hits + [self.pool.allocate() for _ in range(self.cache.blocks_needed(n) - len(hits))]
        request.num_computed = len(hits) * self.block_size
        request.num_registered = len(hits)
        if not request.output_ids:
            request.num_cached_prompt = request.num_computed
        request.slot = heapq.heappop(self._free_slots)
        self._block_tables[request.slot, : len(request.blocks)] = request.blocks
        if self._counts is not None:
            self._fill_counts(request)
        if request.wants_prompt_logprobs and request.prompt_lps is None:
            request.prompt_lps = [TokenLogprob(request.prompt_ids[0], None, None)]
        self.running.append(request)
        return True

    def _register_full_blocks(self, request: Request) -> None:
        """Offer the request's newly completed blocks whose ids are all known to the prefix cache."""
        if not self.pool.enable_prefix_caching or not request.blocks:
            return
        full = min(request.num_computed, request.num_tokens - request.num_pending) // self.block_size
        if full <= request.num_registered:
            return
        hashes = self._block_hashes(request, full)
        for i in range(request.num_registered, full):
            self.pool.register(request.blocks[i], hashes[i])
        request.num_registered = full

    def _block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """The chained hashes of the request's first `num_blocks` full blocks (extended as needed)."""
        have = len(request.hashes)
        if have < num_blocks:
            parent = request.hashes[-1] if request.hashes else None
            request.hashes += block_hashes(request.tokens(have * self.block_size, num_blocks * self.block_size),
                                           self.block_size, parent)
        return request.hashes[:num_blocks]

    # ---- the step -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One scheduler iteration: grow (or preempt) the decoding sequences, admit waiting ones,
        prefill up to max_prefill_tokens prompt tokens (whole prompts or chunks), decode; then
        the outputs of the ids sampled (with async scheduling: of the ids sampled the step before)."""
        outputs: list[StepOutput] = []
        decoding = self._decoding()
        if self._pending and self._must_preempt(decoding):
            outputs += self._resolve_pending()  # preempted sequences must know all their ids
            decoding = self._decoding()  # without the requests that just finished
        launched, immediate = self._schedule(decoding)
        outputs += self._resolve_pending()  # the previous step's ids, while the GPU runs this step
        outputs += immediate
        self._pending = launched  # empty unless async
        return outputs

    def _decoding(self) -> list[Request]:
        """Running sequences with every id but the last one cached, and another to generate."""
        return [r for r in self.running if r.output_ids and r.num_computed == r.num_tokens - 1
                and not self._ends_by_length(r, len(r.output_ids) - 1)]

    def _ends_by_length(self, request: Request, index: int) -> bool:
        """Output id `index` is the request's last: max_tokens, or no position left to feed it back."""
        return index + 1 >= request.params.max_tokens or len(request.prompt_ids) + index >= self.max_seq_len

    def _must_preempt(self, decoding: list[Request]) -> bool:
        """This step's decode needs more new blocks than the pool has free."""
        need = sum(max(0, self.cache.blocks_needed(r.num_computed + 1) - len(r.blocks)) for r in decoding)
        return need > self.pool.num_free

    def _resolve_pending(self) -> list[StepOutput]:
        pending, self._pending = self._pending, []
        return [out for sampled in pending for out in self._resolve(sampled)]

    def _schedule(self, decoding: list[Request]) -> tuple[list[_Sampled], list[StepOutput]]:
        """Queue this step's forwards and sampling (`decoding`: the sequences to decode); returns the
        sampled ids (not read back yet) and the outputs that need no sampling (max_tokens 0)."""
        for r in list(decoding):
            if r.slot is None:  # preempted while growing an earlier one
                continue
            if not self._grow(r, r.num_computed + 1):
                self._requeue(r)
        decoding = [r for r in decoding if r.slot is not None]
        in_decode = set(decoding)
        while self.waiting and self._free_slots:
            if not self._admit(self.waiting[0]):
                break
            self.waiting.pop(0)
        budget = self.max_prefill_tokens
        chunks: list[tuple[Request, int]] = []
        for r in self.running:
            if budget == 0:
                break
            remaining = r.num_tokens - r.num_computed
            if r in in_decode or remaining <= 0 or r.num_pending:  # pending: its last id is its last
                continue
            n = min(remaining, budget)
            chunks.append((r, n))
            budget -= n
        launched: list[_Sampled] = []
        immediate: list[StepOutput] = []
        for group in prefill_groups([n for _, n in chunks]):
            self._prefill([chunks[i] for i in group], launched, immediate)
        if decoding:
            drafts = self._drafts(decoding) if self.speculating else None
            if drafts:
                immediate += self._decode_speculative(decoding, drafts)
            else:
                self._launch(self._decode(decoding), launched, immediate)
        return launched, immediate

    def _launch(self, sampled: _Sampled, launched: list[_Sampled], immediate: list[StepOutput]) -> None:
        """Async: leave the ids to be read back after the next step is queued; else read them now."""
        if self._async:
            launched.append(sampled)
        else:
            immediate += self._resolve(sampled)

    def _prefill(self, chunks: list[tuple[Request, int]], launched: list[_Sampled],
                 immediate: list[StepOutput]) -> None:
        requests = [r for r, _ in chunks]
        lengths = [n for _, n in chunks]
        starts = [r.num_computed for r in requests]
        plan = self._decode_plan
        hidden = last_logits = None
        if (plan is not None and plan.native and sum(lengths) <= plan.native_prefill_max_tokens
                and not any(r.wants_prompt_logprobs for r in requests)):
            last_logits = self._prefill_native(chunks)  # (B, V)
        else:
            tokens = torch.zeros(len(requests), max(lengths), dtype=torch.long)
            for i, r in enumerate(requests):
                tokens[i, : lengths[i]] = torch.tensor(r.tokens(starts[i], starts[i] + lengths[i]))
            tokens = upload(tokens, self.device)
            batch = self.cache.batch([r.blocks for r in requests], starts, lengths)
            hidden = self.prefill_model(tokens, kv_cache=self.cache, batch=batch, return_hidden=True)  # (B, T, d)
        for r, n in chunks:
            r.num_computed += n
            self._register_full_blocks(r)
        for i, r in enumerate(requests):
            if r.wants_prompt_logprobs:
                self._prompt_logprobs(hidden[i, : lengths[i]], r, starts[i])
        done = [i for i, r in enumerate(requests) if r.num_computed == r.num_tokens]  # whole sequence is in
        live = []
        for i in done:
            r = requests[i]
            prompt_lps = None
            if r.wants_prompt_logprobs:
                prompt_lps, r.prompt_lps, r.prompt_lps_done = r.prompt_lps, None, True
            if r.params.max_tokens == 0:  # (the text: U+FFFD if the prompt ends inside a character)
                r.finish_reason = "length"
                self._release(r)
                immediate.append(StepOutput(r, [], r.stream.finish(), [], "length", prompt_logprobs=prompt_lps))
            else:
                live.append((i, prompt_lps))
        if live:
            rows = to_device([i for i, _ in live], torch.int64, self.device)
            if last_logits is not None:
                logits = last_logits[rows]
            else:
                last = hidden[rows, to_device([lengths[i] - 1 for i, _ in live], torch.int64, self.device)]
                logits = self.model.lm_head(last.to(self.dtype))  # (B, V), in the decode steps' dtype
            self._launch(self._sample([requests[i] for i, _ in live], logits,
                                      [lps for _, lps in live] if any(lps for _, lps in live) else None),
                         launched, immediate)

    def _prefill_native(self, chunks: list[tuple[Request, int]]) -> torch.Tensor:
        """A short prefill through the native decode step: each prompt token is one row at its position,
        over its request's blocks. The step writes every row's keys and values before any row attends,
        so row p sees the chunk's keys up to p: causal attention, as the forward computes it. Used for
        chunks of few tokens and no prompt logprobs. Returns each chunk's last-token logits (B, V)."""
        tables, positions, ids, last = [], [], [], []
        for r, n in chunks:
            start = r.num_computed
            tables += [r.blocks] * n
            positions += range(start, start + n)
            ids += r.tokens(start, start + n)
            last.append(len(ids) - 1)
        batch = self.cache.batch(tables, positions, [1] * len(ids))
        return self._decode_plan(torch.tensor(ids)[:, None], self.cache, batch)[last]  # (N, V) -> (B, V)

    def _decode(self, requests: list[Request]) -> _Sampled:
        slots = None
        if self._async:  # each row's input is its last sampled id, which may not be on the host yet
            slots = to_device([r.slot for r in requests], torch.int64, self.device)
            tokens = self._last_tokens[slots][:, None]
        else:
            tokens = to_device([[r.output_ids[-1]] for r in requests], torch.long, self.device)
        batch = self.cache.decode_batch(self._block_tables, [r.slot for r in requests],
                                        [r.num_computed for r in requests], with_mask=self._decode_mask)
        if self._graphs is not None:
            logits = self._graphs(tokens, batch)  # (B, V), one graph replay
        elif self._decode_plan is not None:
            logits = self._decode_plan(tokens, self.cache, batch)  # (B, V)
        else:
            logits = self.model(tokens, kv_cache=self.cache, batch=batch)[:, -1]  # (B, V)
        self._count_fed(requests)
        return self._sample(requests, logits, slots=slots)

    def _count_fed(self, requests: list[Request]) -> None:
        """A decode step cached each request's fed id: count it, and offer a block it completed to the
        prefix cache."""
        for r in requests:
            r.num_computed += 1
            if r.num_computed % self.block_size == 0:
                self._register_full_blocks(r)

    def _drafts(self, decoding: list[Request]) -> dict[Request, list[int]]:
        """Prompt-lookup drafts for this step's greedy sequences (`model.speculative`): at most
        1 + speculative_tokens rows in the step, shared out a draft at a time, each within its request's
        max_tokens and the context, and in blocks the pool has free (a guess never preempts anyone).
        Sequences with penalties (their logits depend on the ids before them) draft nothing. Empty when no
        sequence has a match."""
        spare = 1 + self.speculative_tokens - len(decoding)
        if spare <= 0:
            return {}
        proposals: dict[Request, list[int]] = {}
        for r in decoding:
            p = r.params
            if p.temperature >= GREEDY_BELOW or p.presence_penalty or p.frequency_penalty:
                continue
            # draft j is fed at position num_computed + 1 + j and gives output id len(output_ids) + 1 + j
            limit = min(self.speculative_tokens if r.draft_limit is None else r.draft_limit,
                        p.max_tokens - len(r.output_ids) - 1, self.max_seq_len - 1 - r.num_computed)
            if limit <= 0:
                continue
            if r.lookup is None:
                r.lookup = PromptLookup()
            draft = r.lookup.propose(r.tokens, r.num_tokens, limit)
            if draft:
                proposals[r] = draft
        drafts: dict[Request, list[int]] = {}
        while spare > 0 and proposals:
            for r, draft in list(proposals.items()):
                if spare == 0:
                    break
                taken = drafts.setdefault(r, [])
                taken.append(draft[len(taken)])
                spare -= 1
                if len(taken) == len(draft):
                    del proposals[r]
        for r, draft in list(drafts.items()):
            while draft and self.cache.blocks_needed(r.num_computed + 1 + len(draft)) - len(r.blocks) > \
                    self.pool.num_free:
                draft.pop()
            if draft:
                self._grow(r, r.num_computed + 1 + len(draft))
            else:
                del drafts[r]
        return drafts

    def _decode_speculative(self, requests: list[Request], drafts: dict[Request, list[int]]) -> list[StepOutput]:
        """One decode step over the decoding sequences plus their drafts, and its outputs. A sequence with
        drafts d has rows j = 0..len(d) fed (last id, *d)[j] at position num_computed + j: every row writes
        its keys and values before any row attends, so row j sees the sequence through its own position.
        Row j's argmax follows (last id, d[:j]); while it equals d[j], row j + 1's logits are the real next
        ones. So the sequence emits its accepted drafts and the argmax after them: what one greedy step
        at a time gives (up to near-ties: a row's logits move by ~1e-5 with the rows beside it, as in
        any batch). Keys and values of rejected rows stay in the blocks past the sequence's length,
        where nothing reads them before they are overwritten."""
        slots, positions, ids, first = [], [], [], []
        for r in requests:
            draft = drafts.get(r, [])
            first.append(len(ids))
            ids += [r.output_ids[-1], *draft]
            positions += range(r.num_computed, r.num_computed + 1 + len(draft))
            slots += [r.slot] * (1 + len(draft))
        batch = self.cache.decode_batch(self._block_tables, slots, positions, with_mask=self._decode_mask)
        logits = self._decode_plan(to_device(ids, torch.long, self.device)[:, None], self.cache, batch)  # (rows, V)
        outputs: list[StepOutput] = []
        plain = [i for i, r in enumerate(requests) if r not in drafts]
        if plain:  # sequences without drafts: the usual sampling (any parameters)
            self._count_fed([requests[i] for i in plain])
            outputs += self._resolve(self._sample([requests[i] for i in plain], logits[[first[i] for i in plain]]))
        spec = [(first[i], r, drafts[r]) for i, r in enumerate(requests) if r in drafts]
        rows = [f + j for f, _, draft in spec for j in range(1 + len(draft))]
        params = [r.params for _, r, draft in spec for _ in range(1 + len(draft))]
        n = len(rows)
        logits = logits[rows]  # (n, V): row j of a sequence gives its output id len(output_ids) + j
        self._ban_stops_before_min_tokens(logits, [(r, len(r.output_ids) + j) for _, r, draft in spec
                                                   for j in range(1 + len(draft))])
        sampled = sample(logits, SamplingBatch(
            temperature=[0.0] * n, top_k=[0] * n, top_p=[1.0] * n, generators=[None] * n,
            logit_bias=[p.logit_bias for p in params] if any(p.logit_bias for p in params) else None,
            num_logprobs=max((p.logprobs or 0) for p in params),
            want_logprobs=any(p.logprobs is not None for p in params)), vocab_limit=self.vocab_limit)
        token_ids, lps, top_ids, top_lps = (t.tolist() if t is not None else None for t in
                                            (sampled.token_ids, sampled.logprobs, sampled.top_ids,
                                             sampled.top_logprobs))
        row = 0
        for _, r, draft in spec:
            argmax = token_ids[row: row + 1 + len(draft)]
            accepted = 0
            while accepted < len(draft) and argmax[accepted] == draft[accepted]:
                accepted += 1
            r.draft_limit = min(self.speculative_tokens, accepted + 1)  # fewer guesses after wrong ones
            emitted = argmax[: accepted + 1]
            if self._counts is not None:
                ids = to_device(emitted, torch.int64, self.device)
                self._counts[r.slot].index_add_(0, ids, torch.ones_like(ids, dtype=self._counts.dtype))
            r.num_computed += len(emitted)
            for j, tok in enumerate(emitted):
                r.output_ids.append(tok)
                outputs.append(self._emit(r, len(r.output_ids) - 1, lps and lps[row + j],
                                          top_ids and top_ids[row + j], top_lps and top_lps[row + j]))
                if r.finished:  # (a stop: the drafts after it are dropped, not counted as accepted)
                    emitted = emitted[: j + 1]
                    break
            self.num_draft_tokens += len(draft)
            self.num_accepted_tokens += len(emitted) - 1  # every token past the first came from a draft
            if not r.finished:
                self._trim_blocks(r)
            row += 1 + len(draft)
        return outputs

    def _trim_blocks(self, request: Request) -> None:
        """Give back the blocks past what the request's next decode step needs (those that only held
        rejected drafts), so that a guess never costs another sequence its blocks."""
        keep = self.cache.blocks_needed(request.num_computed + 1)
        if len(request.blocks) > keep:
            self.pool.release(request.blocks[keep:])
            del request.blocks[keep:]
            self._block_tables[request.slot, keep:] = NULL_BLOCK

    def _fill_counts(self, request: Request) -> None:
        """The request's generated-id counts, from its known ids and the one it may have pending
        (that one is only in its slot of `_last_tokens`; admitted requests have none pending, and
        running ones at most the one sampled by the previous step)."""
        row = self._counts[request.slot]
        row.zero_()
        if request.num_pending > 1:
            raise RuntimeError(f"request {request.request_id} has {request.num_pending} ids pending")
        known = request.output_ids[: len(request.output_ids) - request.num_pending]
        ids = to_device(known, torch.int64, self.device)
        if request.num_pending:
            ids = torch.cat([ids, self._last_tokens[request.slot: request.slot + 1]])
        row.index_add_(0, ids, torch.ones_like(ids, dtype=row.dtype))

    def _ban_stops_before_min_tokens(self, logits: torch.Tensor, rows: list[tuple[Request, int]]) -> None:
        """min_tokens: EOS and stop ids may not be output id `index` of a row's request while index <
        min_tokens; their logits become -inf. rows[i]: (request, index) for logits row i."""
        banned = [(i, t) for i, (r, index) in enumerate(rows) if index < r.params.min_tokens
                  for t in dict.fromkeys([*r.params.stop_token_ids, *sorted(self.eos_ids)])]
        if banned:
            logits.index_put_((to_device([i for i, _ in banned], torch.int64, self.device),
                               to_device([t for _, t in banned], torch.int64, self.device)),
                              logits.new_full((), float("-inf")))  # a device fill: no host-to-device copy

    def _sample(self, requests: list[Request], logits: torch.Tensor,
                prompt_lps: list[list[TokenLogprob] | None] | None = None,
                slots: torch.Tensor | None = None) -> _Sampled:
        """Sample one id per row on the device: it goes into output_ids as PENDING (and with async
        scheduling into the row's slot of `_last_tokens`, the next decode's input); `_resolve`
        reads it back."""
        params = [r.params for r in requests]
        self._ban_stops_before_min_tokens(logits, [(r, len(r.output_ids)) for r in requests])
        use_penalties = any(p.presence_penalty or p.frequency_penalty for p in params)
        if use_penalties and self._counts is None:
            # per-slot counts of generated ids, kept only once some request has used a penalty
            self._counts = torch.zeros(self.max_batch_size, self.config.vocab_size, device=self.device)
            for r in self.running:
                self._fill_counts(r)
        if slots is None and (self._counts is not None or self._async):  # (the decode step uploaded them)
            slots = to_device([r.slot for r in requests], torch.int64, self.device)
        num_top = max((p.logprobs or 0) for p in params)
        batch = SamplingBatch(
            temperature=[p.temperature for p in params], top_k=[p.top_k for p in params],
            top_p=[p.top_p for p in params], generators=[r.generator for r in requests],
            presence_penalty=[p.presence_penalty for p in params],
            frequency_penalty=[p.frequency_penalty for p in params],
            logit_bias=[p.logit_bias for p in params] if any(p.logit_bias for p in params) else None,
            output_counts=self._counts[slots] if use_penalties else None,
            num_logprobs=num_top, want_logprobs=any(p.logprobs is not None for p in params))
        plan = self._decode_plan
        out = sample(logits, batch, vocab_limit=self.vocab_limit, native=plan.native_module if plan else None)
        if self._counts is not None:
            self._counts.index_put_((slots, out.token_ids), torch.ones_like(out.token_ids, dtype=torch.float32),
                                    accumulate=True)
        if self._async:
            self._last_tokens[slots] = out.token_ids
        rows = []
        for r in requests:
            r.output_ids.append(PENDING)
            r.num_pending += 1
            rows.append((r, len(r.output_ids) - 1))
        return _Sampled(rows, HostCopy(out.token_ids, out.logprobs, out.top_ids, out.top_logprobs), prompt_lps)

    def _resolve(self, sampled: _Sampled) -> list[StepOutput]:
        """Read a sampling call's ids back (waiting for the device if needed) and advance each
        request: text, stops, lengths. Rows of requests that finished meanwhile are dropped."""
        token_ids, lps, top_ids, top_lps = sampled.copy.lists()
        outputs = []
        for i, (r, index) in enumerate(sampled.rows):
            if r.finished:  # aborted, or stopped at an earlier id while this one was in flight
                continue
            r.output_ids[index] = token_ids[i]
            r.num_pending -= 1
            outputs.append(self._emit(r, index, lps and lps[i], top_ids and top_ids[i], top_lps and top_lps[i],
                                      prompt_lps=sampled.prompt_lps[i] if sampled.prompt_lps else None))
        return outputs

    def _emit(self, r: Request, index: int, logprob: float | None, top_ids: list[int] | None,
              top_logprobs: list[float] | None, prompt_lps: list[TokenLogprob] | None = None) -> StepOutput:
        """The output of the request's id `index` (known, in output_ids): its text, the stop and length
        checks, its logprobs (the row's chosen and top ones); a request that finishes is released."""
        tok = r.output_ids[index]
        finish = None
        check_stop = index >= r.params.min_tokens  # stop strings only once min_tokens are out (vLLM)
        is_eos = tok in self.eos_ids and not r.params.ignore_eos
        if is_eos or tok in r.params.stop_token_ids:
            finish, text = "stop", r.stream.finish(check_stop, at_stop_token=True)
        else:
            text = r.stream.push(tok, check_stop)
            if r.stream.stopped:
                finish = "stop"
            elif self._ends_by_length(r, index):
                finish, text = "length", text + r.stream.finish(check_stop)
        if r.params.logprobs is not None:
            n = r.params.logprobs
            top = list(zip(top_ids[:n], top_logprobs[:n])) if n else []
            token_lps = [TokenLogprob(tok, logprob, top, text_offset=r.stream.offset)]
        else:
            token_lps = []
        if finish is not None:
            r.finish_reason = finish
            r.drop_pending()  # ids queued after this one
        # blocks whose last id was pending, or that a speculative step's rows completed
        self._register_full_blocks(r)
        if finish is not None:
            self._release(r)
        return StepOutput(r, [tok], text, token_lps, finish, prompt_logprobs=prompt_lps)

    def _prompt_logprobs(self, hidden: torch.Tensor, request: Request, start: int) -> None:
        """Append the logprobs of the prompt tokens this chunk predicts: hidden[j] (position
        start + j) predicts prompt token start + j + 1; the first token has none."""
        ids = request.prompt_ids
        end = min(start + hidden.shape[0], len(ids) - 1)  # positions whose next token is a prompt token
        if end <= start:
            return
        n = request.params.logprobs or 0
        targets = to_device(ids[start + 1: end + 1], torch.int64, self.device)
        lp, top_lp, top_ids = chunked_logprobs(hidden[: end - start], self.prefill_model.lm_head, targets, n,
                                               self.vocab_limit, cpu_ops=self.prefill_model.cpu_ops)
        lp = lp.tolist()
        top_lp = top_lp.tolist() if top_lp is not None else None
        top_ids = top_ids.tolist() if top_ids is not None else None
        for j, tok in enumerate(ids[start + 1: end + 1]):
            top = list(zip(top_ids[j], top_lp[j])) if n else []
            request.prompt_lps.append(TokenLogprob(tok, lp[j], top))

    # ---- convenience: one request at a time ------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Run one request to completion (other queued work advances too); yields its outputs."""
        request = self.add_request(prompt_ids, params)
        try:
            while not request.finished:
                for out in self.step():
                    if out.request is request:
                        yield out
        finally:
            if not request.finished:
                self.abort(request)

    def warm_up_prefill(self) -> list[tuple[int, int]]:
        """On the Triton backend, tune flash attention for every pair of query and key length buckets a
        prefill step can run (queries up to the prefill chunk, keys up to the context:
        `kernels.attention.warm_up_causal`), then prefill and decode one short prompt through the whole model
        (its other kernels compile on their first launch, whatever the length); returns the (queries, keys)
        pairs. A pair first met while serving would stall every running stream while the kernel tunes for it
        (seconds on a cold Triton cache; the choices are then cached on disk). Scoring forwards longer than
        the prefill chunk tune on first use. Call it while the engine is idle (at start-up); the prompt's
        blocks go back to the pool (and its prefix cache)."""
        if self.attn_backend != "triton" or self.has_work:
            return []
        from kernels.attention import warm_up_causal

        c = self.config
        pairs = warm_up_causal(c.n_head, c.n_kv_head, c.dim_per_head, self.prefill_dtype, self.device,
                               self.max_seq_len, max_queries=self.max_prefill_tokens)
        ids = [i % self.vocab_limit for i in range(max(1, min(16, self.max_seq_len - 2)))]
        for _ in self.generate(ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)):
            pass
        return pairs

    # ---- scoring --------------------------------------------------------------------
    def encode_for_scoring(self, text: str) -> list[int]:
        return self.tokenizer.encode_prompt(text)

    @property
    def score_batch_tokens(self) -> int:
        """Padded tokens per scoring forward by default. On a CPU 2048, not 4096: at 4096 the widest
        activations (tokens x 2 d_ff fp32) pass glibc's 32 MiB mmap limit, and every forward then
        page-faults fresh memory in (8 x 512 tokens on the default model: ~13% slower); a shorter
        forward also holds the server's decode steps back half as long."""
        return 4096 if self.device.type == "cuda" else 2048

    def score_task(self, sequences: list[list[int]], stride: int | None = None,
                   batch_tokens: int | None = None) -> ScoreTask:
        """A scoring job to advance one batched forward at a time (a server interleaves decode steps):
        forwards of `batch_tokens` padded tokens (default `score_batch_tokens`), or down to
        `max_prefill_tokens` through `advance(max_tokens)` while sequences are decoding.

        Bad input (empty sequences, ids out of range, a bad stride) raises ValueError here."""
        return ScoreTask(self.prefill_model, sequences, self.max_seq_len, self.vocab_limit, stride,
                         batch_tokens or self.score_batch_tokens, unit_tokens=self.max_prefill_tokens)

    def score(self, sequences: list[list[int]], stride: int | None = None, batch_tokens: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> list[ScoreResult]:
        """Per-token logprobs of each sequence; longer than the context -> sliding windows (see ScoreTask)."""
        task = self.score_task(sequences, stride, batch_tokens)
        while not task.done:
            task.advance()
            if progress is not None:
                progress(*task.progress)
        return task.results
