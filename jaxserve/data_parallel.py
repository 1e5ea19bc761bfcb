"""Data parallelism: M engine replicas on disjoint device groups behind one server.

Replica r is a whole AsyncLLMEngine (its own scheduler, KV cache and engine thread) whose mesh is devices
[r * tp, (r + 1) * tp) (EngineConfig.data_parallel_rank, models/sharding.replica_devices). The router gives
each request to the least-loaded replica and offers the AsyncLLMEngine interface the server uses, so the
server does not know how many replicas there are. Requests never move between replicas, so a prefix cached
by one replica helps only the requests routed to it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from jaxserve.async_engine import AsyncLLMEngine, EngineDeadError
from jaxserve.config import EngineConfig
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class DataParallelEngine:
    def __init__(self, config: EngineConfig, replicas: list | None = None):
        if replicas is None:  # built one after another: each loads its weights and compiles its own steps
            replicas = [AsyncLLMEngine(config.replace(data_parallel_rank=rank))
                        for rank in range(config.data_parallel_size)]
            logger.info("data parallel: %d replicas on devices %s", len(replicas),
                        [[d.id for d in r.engine.runner.mesh.devices.flat] for r in replicas])
        self.replicas = replicas
        self.config = self.engine_config = config
        first = replicas[0]
        self.tokenizer, self.model_config = first.tokenizer, first.model_config
        self.eos_token_ids = getattr(first, "eos_token_ids", None) or tuple(first.model_config.eos_token_ids)
        self.max_model_len, self.model_name = first.max_model_len, first.model_name
        self.default_sampling = getattr(first, "default_sampling", {})
        self.in_flight = [0] * len(replicas)  # requests each replica is serving now
        self.routed = [0] * len(replicas)  # requests each replica has been given in all
        self._owner: dict[str, int] = {}  # request id -> replica (for aborts)

    @property
    def ready(self) -> bool:
        return all(r.ready for r in self.replicas)

    @property
    def error(self) -> BaseException | None:
        return next((e for e in map(_error, self.replicas) if e is not None), None)

    async def start(self) -> None:
        for replica in self.replicas:
            await replica.start()

    def shutdown(self) -> None:
        for replica in self.replicas:
            getattr(replica, "shutdown", lambda: None)()

    def pick(self) -> int:
        """The live replica with the fewest requests in flight; ties go to the one given fewer so far, so
        even one request at a time alternates (and keeps every replica's caches warm)."""
        live = [i for i, r in enumerate(self.replicas) if _error(r) is None]
        if not live:
            raise EngineDeadError(f"every data-parallel replica stopped after an error: {self.error!r}")
        return min(live, key=lambda i: (self.in_flight[i], self.routed[i], i))

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        # Runs on the server's event loop only, so the counters need no lock.
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        index = self.pick()
        self._owner[request_id] = index
        self.in_flight[index] += 1
        self.routed[index] += 1
        try:
            # aclosing: when the caller goes away, the replica's stream closes now (and aborts the request)
            # rather than whenever the garbage collector finalizes it.
            async with contextlib.aclosing(self.replicas[index].generate(prompt, sampling_params,
                                                                         request_id)) as stream:
                async for output in stream:
                    yield output
        finally:
            self.in_flight[index] -= 1
            self._owner.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """To the replica serving it; an id no longer (or never) routed goes to all, where unknown ids are
        no-ops, so an abort racing the end of its stream is never lost."""
        index = self._owner.get(request_id)
        for replica in self.replicas if index is None else [self.replicas[index]]:
            await replica.abort(request_id)

    def stats(self):
        """The replicas' EngineStats combined: counts summed, KV usage (and rates) averaged. Compilations are
        counted process-wide by every replica's counter, so the largest is the total."""
        stats = [r.stats() for r in self.replicas]
        merged = {}
        for f in dataclasses.fields(stats[0]):
            values = [getattr(s, f.name) for s in stats]
            if f.name == "kv_cache_usage" or f.name.endswith("_rate"):
                merged[f.name] = sum(values) / len(values)
            elif f.name == "num_compilations":
                merged[f.name] = max(values)
            else:
                merged[f.name] = sum(values)
        return dataclasses.replace(stats[0], **merged)


def _error(replica) -> BaseException | None:
    return getattr(replica, "error", None)


def build_async_engine(config: EngineConfig):
    """The server's engine: one AsyncLLMEngine, or a router over data_parallel_size of them."""
    return DataParallelEngine(config) if config.data_parallel_size > 1 else AsyncLLMEngine(config)
