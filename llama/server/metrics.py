"""The server's counters, served at ``GET /metrics`` in Prometheus' text format (version 0.0.4),
kept by ``prometheus_client`` in a registry of the server's own (no process or platform metrics).

    llama_requests_total{method, endpoint, code}   answers sent, by route and HTTP status
    llama_prompt_tokens_total                  prompt tokens of the requests answered
    llama_generation_tokens_total              tokens generated for them
    llama_queue_length                         requests accepted and waiting for a slot
    llama_running_slots                        slots (rows of the KV cache) decoding now
    llama_slots                                slots in all (--max_batch_size)
    llama_compiled_graphs                      graphs torch.compile made in this process: with --compile, all
                                               of them before /health answers; a rise means a step waited
    llama_time_to_first_token_seconds          histogram: from a request's acceptance to its first token
    llama_kv_cache_bytes                       the KV cache pool's bytes (an 8-bit pool's scales included)
    llama_kv_cache_blocks, _used               the KV cache pool's blocks, and those rows hold now
    llama_prefix_cache_queried_tokens_total    prompt tokens looked up in the prefix cache, and
    llama_prefix_cache_hit_tokens_total        those found there (their ratio is the hit rate)
    llama_prefix_cache_hit_rate                hit tokens / queried tokens since the start
    llama_preemptions_total                    rows that gave their blocks back to a full pool

The gauges are read from the scheduler when scraped.
"""

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)  # seconds

disable_created_metrics()  # a *_created sample per counter is noise for a server's dashboards

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    """The server's metrics in their own registry, safe to update from any thread. ``scheduler``
    gives the gauges (``queue_length()``, ``running_slots()``, ``slots``, ``compiled_graphs()``, and
    its engine's ``pool_use()``)."""

    def __init__(self, scheduler):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "llama_requests",
            "Answers sent, by route and HTTP status.",
            ["method", "endpoint", "code"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "llama_prompt_tokens", "Prompt tokens of the answered requests.", registry=registry
        )
        self.generation_tokens = Counter(
            "llama_generation_tokens", "Tokens generated for the answered requests.", registry=registry
        )
        Gauge("llama_queue_length", "Requests waiting for a slot.", registry=registry).set_function(
            scheduler.queue_length
        )
        Gauge("llama_running_slots", "Slots (rows of the KV cache) decoding now.", registry=registry).set_function(
            scheduler.running_slots
        )
        Gauge("llama_slots", "Slots in all.", registry=registry).set_function(lambda: scheduler.slots)
        Gauge("llama_compiled_graphs", "Graphs torch.compile made in this process.", registry=registry).set_function(
            scheduler.compiled_graphs
        )
        registry.register(PoolCollector(scheduler.engine))
        self.time_to_first_token = Histogram(
            "llama_time_to_first_token_seconds",
            "Seconds from a request's acceptance to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )

    def count_request(self, method: str, endpoint: str, code: int) -> None:
        self.requests.labels(method, endpoint, str(code)).inc()

    def count_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)

    def observe_time_to_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class PoolCollector:
    """The KV cache pool's gauges and counters, read from the engine's ``pool_use()`` when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        pool = self.engine.pool_use()
        yield GaugeMetricFamily(
            "llama_kv_cache_bytes", "Bytes of the KV cache pool, an 8-bit pool's scales included.", pool["bytes"]
        )
        yield GaugeMetricFamily("llama_kv_cache_blocks", "Blocks of the KV cache pool.", pool["blocks"])
        yield GaugeMetricFamily(
            "llama_kv_cache_blocks_used", "Blocks of the pool held by rows now.", pool["used_blocks"]
        )
        yield CounterMetricFamily(
            "llama_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.", pool["queried_tokens"]
        )
        yield CounterMetricFamily(
            "llama_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.", pool["hit_tokens"]
        )
        rate = pool["hit_tokens"] / pool["queried_tokens"] if pool["queried_tokens"] else 0.0
        yield GaugeMetricFamily("llama_prefix_cache_hit_rate", "Hit tokens / queried tokens since the start.", rate)
        yield CounterMetricFamily("llama_preemptions", "Rows preempted from a full pool.", pool["preemptions"])
