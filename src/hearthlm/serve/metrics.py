"""Prometheus metrics, one registry per app (never the process-global one)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .models import ModelManager

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, manager: ModelManager):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hearth_requests", "HTTP requests by dialect and status code",
                                ["dialect", "status"], registry=r)
        self.ttft = Histogram("hearth_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("hearth_time_per_output_token_seconds", "Mean decode time per token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("hearth_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hearth_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("hearth_generation_tokens", "Generated tokens", registry=r)

        def engine_value(fn: Callable) -> Callable[[], float]:
            def read() -> float:
                m = manager.current
                return float(fn(m)) if m is not None else 0.0
            return read

        gauges = {
            "hearth_num_requests_running": ("Sequences running in the engine", lambda m: m.aengine.num_running),
            "hearth_num_requests_waiting": ("Sequences waiting for a slot", lambda m: m.aengine.num_waiting),
            "hearth_kv_cache_usage_ratio": ("Fraction of KV blocks in use", lambda m: m.engine.kv.usage),
            "hearth_prefix_cache_hit_rate": ("Prompt tokens served from the prefix cache / looked up",
                                             lambda m: m.engine.kv.prefix_hit_rate),
            "hearth_model_loaded": ("1 while a model is loaded", lambda m: 1),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(engine_value(fn))

    def render(self) -> bytes:
        return generate_latest(self.registry)
