"""Prometheus instruments of one app, in their own `CollectorRegistry` (never the global one).

Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `kiln_time_to_first_token_seconds`)
so existing dashboards map over. The scheduler's worker thread observes the latency
histograms and token counters as steps complete; the HTTP middleware counts requests by
endpoint and status; gauges are set after every scheduler iteration. The process's own memory and CPU
time are prometheus_client's standard `process_*` families (`process_resident_memory_bytes`, ...); with
--engine-process the engine process (which holds the model) adds its own as `kiln_engine_process_*`.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets reach down to a millisecond: tiny models on a CPU step in ~1-5 ms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0, 20.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class BatchHistogram(Histogram):
    """A histogram that also takes one value observed `count` times in one update (a decode step gives
    most running sequences the same inter-token gap: one update per step instead of one per token)."""

    def observe_many(self, amount: float, count: int) -> None:
        """`observe(amount)` `count` times over, as one update of the sum and of one bucket."""
        if count == 1:
            self.observe(amount)
            return
        self._raise_if_not_observable()
        self._sum.inc(amount * count)
        for bound, bucket in zip(self._upper_bounds, self._buckets):
            if amount <= bound:
                bucket.inc(count)
                break


class ServerMetrics:
    def __init__(self, model_name: str, process_namespace: str = "") -> None:
        """`process_namespace` prefixes this process's `process_*` families ("kiln_engine" in the engine process)."""
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(namespace=process_namespace, registry=r)  # (nothing where there is no /proc)
        self.time_to_first_token = Histogram(
            "kiln_time_to_first_token_seconds", "Arrival to first generated token, per sequence.",
            buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = BatchHistogram(
            "kiln_inter_token_latency_seconds", "Time between consecutive generated tokens of a sequence.",
            buckets=ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "kiln_e2e_request_latency_seconds", "Arrival to last token, per finished sequence.",
            buckets=REQUEST_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            "kiln_request_queue_time_seconds", "Arrival to the start of the prefill step, per sequence.",
            buckets=REQUEST_BUCKETS, registry=r)
        self.engine_step = Histogram(
            "kiln_engine_step_seconds", "Duration of each engine step (admission, prefill chunks, one decode "
            "step); every running sequence waits for it.", buckets=STEP_BUCKETS, registry=r)
        self.event_loop_delay = Histogram(
            "kiln_event_loop_delay_seconds", "Time a step's outputs wait for the server's event loop to hand them "
            "to the streams: well above a millisecond, HTTP and streaming (not the engine) hold the tokens back.",
            buckets=STEP_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of the sequences that started "
                                     "generating (prefix-cache hits included; each of n choices counts, as in "
                                     "vLLM).", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("kiln_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.request_finish = Counter("kiln_request_finish", "Finished sequences by finish reason "
                                      "(stop, length, abort, error).", ["finish_reason"], registry=r)
        self.num_requests_running = Gauge("kiln_num_requests_running",
                                          "Sequences running (holding a slot and KV blocks).", registry=r)
        self.num_requests_waiting = Gauge("kiln_num_requests_waiting", "Sequences waiting for a slot, and "
                                          "perplexity inputs not yet started.", registry=r)
        self.kv_cache_usage_ratio = Gauge("kiln_kv_cache_usage_ratio",
                                          "Fraction of KV-cache blocks held by running sequences (0-1).",
                                          registry=r)
        self.kv_cache_slots_used_ratio = Gauge("kiln_kv_cache_slots_used_ratio",
                                               "Fraction of the running-sequence slots (--max-batch-size) in use "
                                               "(0-1).", registry=r)
        self.prefix_cache_queries = Counter("kiln_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.", registry=r)
        self.prefix_cache_hits = Counter("kiln_prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache (their prefill skipped).",
                                         registry=r)
        self.num_preemptions = Counter("kiln_num_preemptions",
                                       "Sequences preempted (blocks freed, recomputed later) when the KV pool "
                                       "ran out.", registry=r)
        self.spec_decode_draft_tokens = Counter("kiln_spec_decode_draft_tokens",
                                                "Draft tokens verified by decode steps (prompt-lookup speculation "
                                                "for greedy requests).", registry=r)
        self.spec_decode_accepted_tokens = Counter("kiln_spec_decode_accepted_tokens",
                                                   "Draft tokens that were right: each one is a token emitted "
                                                   "without a decode step of its own.", registry=r)
        self.perplexity_requests = Counter("kiln_perplexity_requests", "Perplexity jobs that reached the "
                                           "scheduler, by outcome (requests refused before it are counted in "
                                           "kiln_requests_total).", ["status"], registry=r)
        self.perplexity_latency = Histogram("kiln_perplexity_latency_seconds",
                                            "Arrival to result of a perplexity job.", buckets=REQUEST_BUCKETS,
                                            registry=r)
        self.perplexity_tokens = Counter("kiln_perplexity_tokens", "Tokens scored by perplexity jobs (each "
                                         "input's first token, which has no context, is not).", registry=r)
        info = Gauge("kiln_model_info", "The served model (value 1).", ["model_name"], registry=r)
        info.labels(model_name=model_name).set(1)
        self.cache_config_info = Gauge("kiln_cache_config_info", "The KV cache's configuration, set once the model "
                                       "is loaded (value 1; vLLM's cache_config_info).",
                                       ["block_size", "num_blocks", "cache_dtype", "enable_prefix_caching"],
                                       registry=r)

    def set_cache_config(self, cache) -> None:
        """Label kiln_cache_config_info with a loaded engine's KV cache (`model.kv_cache.KVCache`)."""
        self.cache_config_info.labels(block_size=str(cache.block_size), num_blocks=str(cache.num_blocks),
                                      cache_dtype=str(cache.k.dtype).removeprefix("torch."),
                                      enable_prefix_caching=str(cache.pool.enable_prefix_caching).lower()).set(1)

    def render(self, keep: Callable[[str], bool] | None = None) -> bytes:
        """The text exposition; `keep(family name)` picks which metric families (all by default)."""
        if keep is None:
            return generate_latest(self.registry)
        return generate_latest(_Only(self.registry, keep))


class _Only:
    """A registry's metric families whose names pass a test (what `generate_latest` collects)."""

    def __init__(self, registry: CollectorRegistry, keep: Callable[[str], bool]):
        self.registry = registry
        self.keep = keep

    def collect(self):
        return (family for family in self.registry.collect() if self.keep(family.name))
