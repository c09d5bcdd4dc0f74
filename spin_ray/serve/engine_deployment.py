"""`SpinEngine`: the Ray Serve deployment holding one engine (one replica per GPU).

It streams `RequestOutput` deltas to the ingress and reports its KV use and load to the KV
working-set router (`record_routing_stats`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator
from typing import Any

from spin_ray.metrics import EngineMetrics, engine_labels
from spin_ray.metrics.ray_sink import RaySink
from spin_ray.outputs import RequestOutput
from spin_ray.serve.async_engine import AsyncEngine
from spin_ray.serve.engine_client import EngineRequest, ModelInfo
from spin_ray.serve.placement import OutputLengths, ReplicaStats, WorkingSet, predict_working_set


class SpinEngine:
    def __init__(self, llm_kwargs: dict[str, Any], default_output_tokens: int = 1024):
        """`default_output_tokens`: the output length expected of a request (at most its
        max_tokens) until this replica has seen requests finish (placement.py)."""
        from spin_ray.llm import LLM

        engine = LLM(**llm_kwargs).llm_engine
        if engine.device.type == "cuda":  # compile and capture now, not in the first requests
            engine.warm_up()  # (on the CPU nothing is compiled or captured)
        # after the warm-up, which the metrics do not count
        self.metrics = EngineMetrics(RaySink(), engine_labels(engine.config), engine.kv_stats())
        engine.stat_loggers.append(self.metrics)
        self.engine = AsyncEngine(engine)
        self.kv_cache = engine.kv_cache
        self.layout = engine.kv_cache.layout
        self.info = ModelInfo(max_model_len=engine.config.scheduler.max_model_len)
        self.default_output_tokens = default_output_tokens
        self.output_lengths = OutputLengths()
        self.working_sets: dict[str, WorkingSet] = {}
        self.context_tokens: dict[str, int] = {}
        """Prompt + max_tokens of each request held: the measure of load the router also
        counts for requests it sent that the last report does not list."""

    async def generate(self, request: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        """Stream the deltas of `request`; cancelling the call aborts it in the engine."""
        expected = self.output_lengths.p90() or self.default_output_tokens
        demand = request.demand.expecting(expected)
        self.working_sets[request.request_id] = predict_working_set(demand, self.layout)
        self.context_tokens[request.request_id] = demand.context_tokens
        generated = 0
        try:
            prompt = {"prompt_token_ids": request.prompt_token_ids}
            async for output in self.engine.generate(request.request_id, prompt, request.params):
                generated += len(output.outputs[0].token_ids)
                if output.finished:
                    self.output_lengths.add(generated)
                yield output
        finally:
            del self.working_sets[request.request_id]
            del self.context_tokens[request.request_id]

    def model_info(self) -> ModelInfo:
        return self.info

    def record_routing_stats(self) -> dict[str, Any]:
        """`ReplicaStats` as a dict, polled by Ray Serve for the router."""
        load = self.engine.load()
        usage = self.kv_cache.usage()
        hbm_used, host_used = usage.hbm_pages_used, usage.host_pages_used
        return ReplicaStats(
            timestamp=time.time(),
            layout=self.layout,
            hbm_pages_total=usage.hbm_pages_total,
            hbm_pages_committed=max(sum(w.hbm_pages for w in self.working_sets.values()), hbm_used),
            host_pages_total=usage.host_pages_total,
            host_pages_committed=max(
                sum(w.host_pages for w in self.working_sets.values()), host_used
            ),
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            running_tokens=sum(self.context_tokens.values()),
            request_ids=tuple(self.working_sets),
            hbm_pages_used=hbm_used,
            host_pages_used=host_used,
            requests_aborted=load.num_aborted,
            output_tokens_p90=self.output_lengths.p90(),
        ).to_dict()

    def kv_stats(self) -> dict[str, Any]:
        """The engine's cache statistics (`KVStats` as a dict) as last exported to the metrics:
        at most `kv_stats_interval_s` old, and current whenever the engine is idle."""
        return dataclasses.asdict(self.metrics.last_kv)

    def check_health(self) -> None:
        """Ray Serve restarts the replica if this raises (the step loop died)."""
        self.engine.check_health()

    def __del__(self):
        if hasattr(self, "engine"):  # not when the constructor failed
            self.engine.shutdown()
