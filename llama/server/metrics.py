"""The server's counters, served at ``GET /metrics`` in Prometheus' text format (version 0.0.4).

    llama_requests_total{method, endpoint, code}   answers sent, by route and HTTP status
    llama_prompt_tokens_total                  prompt tokens of the requests answered
    llama_generation_tokens_total              tokens generated for them
    llama_queue_length                         requests accepted and waiting for a slot
    llama_running_slots                        slots (rows of the KV cache) decoding now
    llama_slots                                slots in all (--max_batch_size)
    llama_compiled_graphs                      graphs torch.compile made in this process: with --compile, all
                                               of them before /health answers; a rise means a step waited
    llama_time_to_first_token_seconds          histogram: from a request's acceptance to its first token
    llama_kv_cache_blocks, _used               the KV cache pool's blocks, and those rows hold now
    llama_prefix_cache_queried_tokens_total    prompt tokens looked up in the prefix cache, and
    llama_prefix_cache_hit_tokens_total        those found there (their ratio is the hit rate)
    llama_prefix_cache_hit_rate                hit tokens / queried tokens since the start
    llama_preemptions_total                    rows that gave their blocks back to a full pool

The HTTP threads count into one ``Metrics``; the gauges are read from the scheduler when scraped.
"""

import bisect
import threading
from collections import Counter
from typing import List

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)  # seconds
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters and the time-to-first-token histogram, safe to update from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (method, endpoint, code) -> answers
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # per bucket (not cumulative); the last is +Inf
        self.ttft_sum = 0.0

    def count_request(self, method: str, endpoint: str, code: int) -> None:
        with self.lock:
            self.requests[method, endpoint, code] += 1

    def count_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens

    def observe_time_to_first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self.ttft_sum += seconds

    def render(self, queue_length: int, running_slots: int, slots: int, compiled_graphs: int, pool: dict) -> str:
        """The exposition text, with the scheduler's gauges as given; ``pool``: the engine's
        ``pool_use()``."""
        with self.lock:
            lines: List[str] = []
            metric(lines, "llama_requests_total", "counter", "Answers sent, by route and HTTP status.")
            for (method, endpoint, code), count in sorted(self.requests.items()):
                lines.append(f'llama_requests_total{{method="{method}",endpoint="{endpoint}",code="{code}"}} {count}')
            metric(lines, "llama_prompt_tokens_total", "counter", "Prompt tokens of the answered requests.", self.prompt_tokens)
            metric(lines, "llama_generation_tokens_total", "counter", "Tokens generated for the answered requests.", self.generation_tokens)
            metric(lines, "llama_queue_length", "gauge", "Requests waiting for a slot.", queue_length)
            metric(lines, "llama_running_slots", "gauge", "Slots (rows of the KV cache) decoding now.", running_slots)
            metric(lines, "llama_slots", "gauge", "Slots in all.", slots)
            metric(lines, "llama_compiled_graphs", "gauge", "Graphs torch.compile made in this process.", compiled_graphs)
            metric(lines, "llama_kv_cache_blocks", "gauge", "Blocks of the KV cache pool.", pool["blocks"])
            metric(lines, "llama_kv_cache_blocks_used", "gauge", "Blocks of the pool held by rows now.", pool["used_blocks"])
            metric(lines, "llama_prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.", pool["queried_tokens"])
            metric(lines, "llama_prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.", pool["hit_tokens"])
            metric(lines, "llama_prefix_cache_hit_rate", "gauge", "Hit tokens / queried tokens since the start.",
                   pool["hit_tokens"] / pool["queried_tokens"] if pool["queried_tokens"] else 0.0)
            metric(lines, "llama_preemptions_total", "counter", "Rows preempted from a full pool.", pool["preemptions"])
            name = "llama_time_to_first_token_seconds"
            metric(lines, name, "histogram", "Seconds from a request's acceptance to its first generated token.")
            cumulative = 0
            for bound, count in zip(TTFT_BUCKETS + ("+Inf",), self.ttft_counts):
                cumulative += count
                lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
            lines += [f"{name}_sum {self.ttft_sum}", f"{name}_count {cumulative}"]
        return "\n".join(lines) + "\n"


def metric(lines: List[str], name: str, kind: str, help_text: str, value=None) -> None:
    """A metric's HELP and TYPE lines, and its one sample if ``value`` is given."""
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    if value is not None:
        lines.append(f"{name} {value}")
