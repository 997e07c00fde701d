"""Loading the engine `kiln serve`'s settings describe (a module of its own: with --engine-process the
loader is pickled by reference into the engine process, which cannot import it from `__main__`)."""

from __future__ import annotations

import logging
import time

from .settings import ServerSettings


def set_threads(settings: ServerSettings) -> None:
    import torch

    torch.set_num_threads(settings.num_threads)
    try:
        torch.set_num_interop_threads(1)  # one worker thread runs the model; no inter-op pool needed
    except RuntimeError:  # already set (parallel work started), harmless
        pass


def load_configured_engine(settings: ServerSettings):
    """The engine `settings` describe, loaded, logged and warmed up (on the scheduler's worker thread; with
    --engine-process in the engine process, which is why it is a module-level function of the settings)."""
    from model.cli import load_engine, resolve_device

    if settings.engine_process:
        set_threads(settings)
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
                         speculative_tokens=settings.speculative_tokens, kv_cache_dtype=settings.kv_cache_dtype,
                         release_weights=True)
    cache = engine.cache
    log = logging.getLogger("kiln.server")
    log.info(
        "model %r loaded in %.2f s: %s %s, context %d tokens, up to %d sequences, KV pool %d blocks x %d "
        "tokens (%.1f MiB of %s, prefix caching %s), prefill chunk %d tokens (in %s), decode %s%s%s%s",
        settings.served_model_name, time.perf_counter() - start, engine.device,
        str(engine.dtype).removeprefix("torch."),
        engine.max_seq_len, engine.max_batch_size, cache.num_blocks, cache.block_size,
        cache.k.nbytes * 2 / 2**20, str(cache.k.dtype).removeprefix("torch."),
        "on" if engine.pool.enable_prefix_caching else "off",
        engine.max_prefill_tokens, engine.prefill_math, engine.decode_path,
        ", async scheduling" if engine.async_scheduling else "",
        f", prompt-lookup speculation for greedy requests (up to {engine.speculative_tokens} drafts per step)"
        if engine.speculating else "", ", in an engine process of its own" if settings.engine_process else "")
    if engine.released_bytes:
        log.info("the linear layers keep their fp32 matrices only as oneDNN packs: %.2f GB less memory",
                 engine.released_bytes / 1e9)
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
