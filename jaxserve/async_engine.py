"""The engine behind the server: one thread steps the LLMEngine; asyncio callers stream its outputs.

Requests and aborts cross into the engine thread through a lock-protected inbox drained before each
step; outputs cross back through `loop.call_soon_threadsafe` (once a step per event loop) into one
asyncio.Queue per request, so neither side ever blocks the other.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from jaxserve.config import EngineConfig
from jaxserve.engine import EngineStats, LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.sequence import request_options

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


def _put_all(batch) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config or EngineConfig())
        self.config = self.engine_config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.eos_token_ids = self.engine.eos_token_ids
        self.max_model_len = self.engine.max_model_len
        self.default_sampling = self.engine.default_sampling
        self.model_name = self.engine.loaded.model_name
        self.ready = True  # weights loaded and every bucket compiled in __init__
        self._inbox: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- asyncio side ---------------------------------------------------------------------------
    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; raises ValueError (before anything runs) for invalid input."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error!r}")
        await self.start()
        # Validate on the caller's side so a bad request fails fast with its message.
        prompt_text, prompt_ids = self.engine.prompt_for(prompt, sampling_params)
        options = request_options(prompt)
        self.engine.check_priority(options.get("priority", 0))
        self.engine.validate(prompt_ids, sampling_params)
        if sampling_params.guided_decoding is not None:
            self.engine.guided_matcher(sampling_params)  # compiles (cached) and raises on a bad grammar
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = (loop, queue)
        self._post("add", (request_id, {"prompt": prompt_text, "prompt_token_ids": prompt_ids, **options},
                           sampling_params))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect, cancellation)
                self._post("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- engine thread --------------------------------------------------------------------------
    def _post(self, kind: str, payload) -> None:
        with self._lock:
            self._inbox.append((kind, payload))
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items) -> None:
        """(request id, item) pairs into their callers' queues, one hand-off per event loop: each
        call_soon_threadsafe costs the engine thread ~15 us and wakes the loop, and a step with drafts makes
        an output per token (~110 a 32-sequence step)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            target = self._queues.get(request_id)
            if target is not None:
                loop, queue = target
                batches.setdefault(loop, []).append((queue, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        for kind, payload in items:
            if kind == "add":
                request_id, prompt, params = payload
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as e:  # validated already; anything left is reported to that caller
                    self._deliver(request_id, ValueError(str(e)))
            elif kind == "abort":
                output = self.engine.abort_request(payload)
                if output is not None:  # a caller still waiting gets a final "abort" output, not a hang
                    self._deliver(payload, output)

    def _run(self) -> None:
        # A step's outputs are handed over once the next step is dispatched: the streams' Python (~90 us a
        # token) then runs while the device computes, not while the engine thread schedules (both need the GIL).
        pending: list[tuple[str, RequestOutput]] = []

        def hand_over() -> None:
            nonlocal pending
            if pending:
                self._deliver_all(pending)
                pending = []

        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    hand_over()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self.engine.step(dispatched=hand_over)
                hand_over()  # (a step that dispatched nothing has called it already)
                pending = [(output.request_id, output) for output in outputs]
        except BaseException as e:  # a bug: fail every waiting request instead of hanging them
            logger.exception("engine thread crashed")
            self.error = e
            for request_id in list(self._queues):
                self._deliver(request_id, EngineDeadError(f"engine error: {e!r}"))
