"""An asyncio front for `LLMEngine`: one thread steps the engine, each request streams through
its own queue.

The engine is not thread-safe, so only the step thread touches it. Coroutines hand it commands
(add, abort) through a queue; the thread runs them between steps, then steps while any request
is unfinished and sleeps otherwise. Outputs go back to each request's `asyncio.Queue` through
`loop.call_soon_threadsafe`. A caller that stops iterating (client gone, task cancelled) aborts
its request, so its pages are free by the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from spin_ray.engine.llm_engine import LLMEngine, Prompt
from spin_ray.outputs import RequestOutput
from spin_ray.sampling_params import SamplingParams
from spin_ray.serve.engine_client import EngineDeadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLoad:
    """Requests in the engine, as of the last step."""

    num_running: int
    num_waiting: int
    num_tokens: int
    """Prompt + generated tokens of the unfinished requests."""
    num_aborted: int = 0
    """Requests aborted unfinished since the engine started (caller gone or cancelled)."""


@dataclass
class _Stream:
    """Where one request's outputs go, and how much of them its caller has seen."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    num_tokens_sent: int = 0
    text_sent: str = ""
    num_tokens: int = 0


class AsyncEngine:
    """`generate` streams `RequestOutput` deltas (only the new text, token ids and logprobs)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._load = EngineLoad(0, 0, 0)
        self._num_aborted = 0
        self._error: BaseException | None = None
        self._stopped = False
        self._lock = threading.Lock()  # orders `_submit` against the loop stopping
        self._thread = threading.Thread(target=self._run, name="spin-ray-step-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ coroutine side

    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield deltas until the request finishes. Bad input raises `ValueError` (from the
        engine) before the first delta; stopping early aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        if not self._submit(("add", request_id, prompt, params, stream)):
            self.check_health()
        finished = False
        try:
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine never took it, or the loop died
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._submit(("abort", request_id))

    def load(self) -> EngineLoad:
        return self._load

    def check_health(self) -> None:
        """Raise `EngineDeadError` if the step loop has stopped."""
        if self._error is not None:
            raise EngineDeadError(f"engine step loop failed: {self._error!r}") from self._error
        if self._stopped:
            raise EngineDeadError("engine is shut down")

    def shutdown(self) -> None:
        """Stop the step loop; unfinished requests are aborted."""
        self._submit(("stop",))
        self._thread.join(timeout=10)

    def _submit(self, command: tuple) -> bool:
        """Queue `command` for the step thread; False if the loop has stopped."""
        with self._lock:
            if self._stopped:
                return False
            self._commands.put(command)
        self._wakeup.set()
        return True

    # ------------------------------------------------------------ step thread

    def _run(self) -> None:
        try:
            while True:
                if not self._run_commands():
                    break
                if not self.engine.has_unfinished_requests():
                    self._publish_load()
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                deliveries = [self._delta_for(output) for output in self.engine.step()]
                self._publish_load()  # before the callers hear of this step
                for stream, delta in filter(None, deliveries):
                    _send(stream, delta)
        except BaseException as err:  # the loop is dead: tell every waiting caller
            logger.exception("engine step loop failed")
            self._error = err
            dead = EngineDeadError(f"engine step loop failed: {err!r}")
            for stream in self._streams.values():
                _send(stream, dead)
            self._streams.clear()
        finally:
            with self._lock:
                self._stopped = True
            self._fail_pending_adds()

    def _run_commands(self) -> bool:
        """Run queued commands; False once asked to stop."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            kind = command[0]
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self.engine.abort_request(command[1])
                if self._streams.pop(command[1], None) is not None:  # not finished meanwhile
                    self._num_aborted += 1
                    self._publish_load()
            else:  # stop
                for request_id, stream in self._streams.items():
                    self.engine.abort_request(request_id)
                    _send(stream, EngineDeadError("engine is shut down"))
                self._streams.clear()
                return False

    def _add(self, request_id: str, prompt: Prompt, params: SamplingParams, stream: _Stream):
        try:
            self.engine.add_request(request_id, prompt, params, arrival_time=time.monotonic())
        except Exception as err:  # bad input: hand the error to the caller
            _send(stream, err)
            return
        stream.num_tokens = len(self.engine.requests[request_id].prompt_token_ids)
        self._streams[request_id] = stream

    def _delta_for(self, output: RequestOutput) -> tuple[_Stream, RequestOutput] | None:
        stream = self._streams.get(output.request_id)
        if stream is None:  # aborted while this step ran
            return None
        if output.finished:
            del self._streams[output.request_id]
        return stream, _delta(output, stream)

    def _publish_load(self) -> None:
        self._load = EngineLoad(
            num_running=self.engine.num_running,
            num_waiting=self.engine.num_waiting,
            num_tokens=sum(s.num_tokens for s in self._streams.values()),
            num_aborted=self._num_aborted,
        )

    def _fail_pending_adds(self) -> None:
        """Answer adds queued before the loop stopped but never run, so no caller waits."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _send(command[4], EngineDeadError("engine is shut down"))


def _send(stream: _Stream, item: RequestOutput | BaseException) -> None:
    """Hand `item` to the stream's caller; a caller whose event loop has closed is gone (its
    generator's cleanup aborts the request)."""
    with contextlib.suppress(RuntimeError):  # "Event loop is closed"
        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)


def _delta(output: RequestOutput, stream: _Stream) -> RequestOutput:
    """`output` (cumulative) reduced to what `stream`'s caller has not seen yet."""
    completion = output.outputs[0]
    new_tokens = completion.token_ids[stream.num_tokens_sent :]
    text = completion.text
    # The text only grows, except when a stop string is cut off at the end; text already sent
    # cannot be taken back, so a delta never reaches behind it.
    new_text = text[len(stream.text_sent) :] if text.startswith(stream.text_sent) else ""
    logprobs = None
    if completion.logprobs is not None:
        logprobs = completion.logprobs[stream.num_tokens_sent :]
    stream.num_tokens_sent = len(completion.token_ids)
    stream.text_sent = text if text.startswith(stream.text_sent) else stream.text_sent
    stream.num_tokens = len(output.prompt_token_ids) + len(completion.token_ids)
    delta = dataclasses.replace(
        completion, text=new_text, token_ids=list(new_tokens), logprobs=logprobs
    )
    return dataclasses.replace(output, outputs=[delta])
