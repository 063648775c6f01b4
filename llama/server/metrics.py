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

The gauges are read from the scheduler when scraped.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)  # seconds

disable_created_metrics()  # a *_created sample per counter is noise for a server's dashboards

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    """The server's metrics in their own registry, safe to update from any thread. ``scheduler``
    gives the gauges (``queue_length()``, ``running_slots()``, ``slots``)."""

    def __init__(self, scheduler):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("llama_requests", "Answers sent, by route and HTTP status.", ["method", "endpoint", "code"], registry=registry)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens of the answered requests.", registry=registry)
        self.generation_tokens = Counter("llama_generation_tokens", "Tokens generated for the answered requests.", registry=registry)
        Gauge("llama_queue_length", "Requests waiting for a slot.", registry=registry).set_function(scheduler.queue_length)
        Gauge("llama_running_slots", "Slots (rows of the KV cache) decoding now.", registry=registry).set_function(scheduler.running_slots)
        Gauge("llama_slots", "Slots in all.", registry=registry).set_function(lambda: scheduler.slots)
        Gauge("llama_compiled_graphs", "Graphs torch.compile made in this process.", registry=registry).set_function(scheduler.compiled_graphs)
        self.time_to_first_token = Histogram(
            "llama_time_to_first_token_seconds", "Seconds from a request's acceptance to its first generated token.",
            buckets=TTFT_BUCKETS, registry=registry,
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
