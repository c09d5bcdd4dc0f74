"""Continuous batching with chunked prefill, FCFS admission and preemption by recompute."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from spin_ray.engine.config import SchedulerConfig
from spin_ray.engine.request import Request, RequestStatus


class KVCapacity(Protocol):
    """What the scheduler asks of the KV cache (`PageTables` is the dense implementation)."""

    def can_grow(self, request_id: str, num_tokens: int) -> bool: ...
    def grow(self, request_id: str, num_tokens: int) -> None: ...
    def release(self, request_id: str) -> None: ...


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_new_tokens` tokens of `request`, starting at its `num_computed_tokens`."""

    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's last known token, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]
    """Requests whose pages were taken back this step (they will be recomputed)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Each step: running requests first (decodes and unfinished prefill chunks, oldest first),
    then waiting requests in arrival order while the token budget, `max_num_seqs` and free pages
    allow; a request is admitted only when pages for its whole prompt are free, and takes them
    all at once. While a waiting request could be admitted, the running prompts' chunks leave
    `admission_reserve_tokens` of the budget to it, so a long prompt's prefill does not hold
    new requests back (vLLM bounds long prefills' share of a step the same way). When a
    running request cannot get pages for a new token, the most recently admitted request is
    preempted: its pages are freed and it goes back to the front of the queue to be
    recomputed. A request whose pending token (async scheduling) is its last by length is not
    scheduled again: it finishes when that token reaches the host, and until then a request
    that cannot grow waits for its pages instead of preempting (the synchronous engine would
    have had them back already)."""

    def __init__(self, config: SchedulerConfig, kv: KVCapacity):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []

        # while a waiting request could be admitted, running prompts leave part of the budget
        # to it: a short request is not held behind a long prompt's chunks
        prefill_room = budget - (self.config.admission_reserve_tokens if self._can_admit() else 0)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._ends_with_pending_token(request):
                i += 1
                continue
            n = min(request.num_uncomputed_tokens, budget)
            if request.num_uncomputed_tokens > 1:  # a prompt chunk (a decode is one token)
                n = min(n, prefill_room)
                if n < 2:  # a one-token chunk would run as a decode
                    i += 1
                    continue
                prefill_room -= n
            target = request.num_computed_tokens + n
            if not self.kv.can_grow(request.request_id, target) and self._pages_return_soon():
                i += 1  # wait a step rather than preempt (a recompute of the whole context)
                continue
            while not self.kv.can_grow(request.request_id, target):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break
            self.kv.grow(request.request_id, target)
            chunks.append(ScheduledChunk(request, n))
            budget -= n
            i += 1

        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            n = min(request.num_uncomputed_tokens, budget)
            if n < request.num_uncomputed_tokens and not self.config.enable_chunked_prefill:
                break
            if n == 1 < request.num_uncomputed_tokens:  # a one-token chunk would run as a decode
                break
            # pages for every known token now, not just this chunk: admitting on the first
            # chunk alone let a long prompt in whenever a chunk's pages were free, only to be
            # preempted (and its chunks thrown away) as soon as the next chunk did not fit
            if not self.kv.can_grow(request.request_id, request.num_tokens):
                break
            self.waiting.popleft()
            self.kv.grow(request.request_id, request.num_tokens)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            chunks.append(ScheduledChunk(request, n))
            budget -= n

        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark a running or waiting request finished and give its pages back."""
        assert status.is_finished
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        request.finished_time = time.monotonic()
        self.kv.release(request.request_id)

    def _can_admit(self) -> bool:
        """The first waiting request would be admitted now, budget aside."""
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return False
        head = self.waiting[0]
        return self.kv.can_grow(head.request_id, head.num_tokens)

    def _ends_with_pending_token(self, request: Request) -> bool:
        """Its pending token reaches max_tokens or max_model_len (the detokenizer's "length"
        finish), so there is nothing more to compute for it."""
        limit = self.config.max_model_len
        return request.num_pending_tokens > 0 and (
            request.num_output_tokens >= request.sampling_params.max_tokens
            or (limit is not None and request.num_tokens >= limit)
        )

    def _pages_return_soon(self) -> bool:
        """A running request finishes when its pending token is read, later in this step."""
        return any(self._ends_with_pending_token(r) for r in self.running)

    def _preempt(self, request: Request) -> None:
        self.kv.release(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)
