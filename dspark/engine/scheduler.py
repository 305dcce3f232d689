"""The request scheduler: which requests run this step, with how many prompt tokens, and who is preempted.

Queues: `waiting` (first come, first served; a preempted request goes back to its front) and `running`
(in admission order). Each step has two phases, around the drafter (`dspark.engine.engine`):

1. `schedule_decode()`: every running request that has its first token decodes. Before the step it must
   hold the KV pages its committed tokens + 1 + γ need (`dspark.engine.block_manager`); when the budget
   cannot grow, the newest running request is preempted (recompute: its pages are freed, it returns to
   the front of `waiting` with its output kept; on readmission the prompt and all but its newest token
   are prefilled again, without sampling, so no token is lost or changed) until the older ones fit.
2. `schedule_prefill(token_budget)`: the tokens the decoding rows leave of the step's budget go to prompt
   chunks (chunked prefill): first the running requests still prefilling, in admission order, then new
   admissions from the head of `waiting` while the whole prompt plus a first step fits the free pages
   (keeping `WATERMARK` of the pages free when others run) and fewer than `max_num_seqs` run. A long
   prompt therefore takes several steps and never stalls the others' decoding.
"""

from __future__ import annotations

from collections import deque

from dspark.engine.block_manager import BlockManager
from dspark.engine.request import Request, Status

WATERMARK = 0.01  # share of the KV pages a new admission leaves free while others run (vLLM's default)


class RequestScheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out of the queues and return its pages to the budget."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        self.blocks.release(request.request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- phase 1 --------------------------------------------------------------------------------------
    def schedule_decode(self) -> tuple[list[Request], list[Request]]:
        """(requests that decode this step, requests preempted to make room), both in admission order."""
        decoding, preempted = [], []
        for request in list(self.running):
            if request.status is not Status.RUNNING or request.prefilling:
                continue
            while not self.blocks.try_hold(request.request_id, request.num_computed):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                decoding.append(request)
        decoding = [r for r in decoding if r.status is Status.RUNNING]
        return decoding, preempted

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.release(request.request_id)
        request.status = Status.WAITING
        request.num_computed = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- phase 2 --------------------------------------------------------------------------------------
    def schedule_prefill(self, token_budget: int) -> tuple[list[tuple[Request, int]], list[Request]]:
        """(prompt chunks (request, tokens) of this step, requests admitted now), within `token_budget`."""
        chunks: list[tuple[Request, int]] = []
        admitted: list[Request] = []
        for request in self.running:
            if token_budget <= 0:
                break
            if request.prefilling:
                n = min(request.prefill_length - request.num_computed, token_budget)
                chunks.append((request, n))
                token_budget -= n
        watermark = max(1, int(WATERMARK * self.blocks.num_pages))
        while self.waiting and token_budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            need = self.blocks.pages_needed(request.prefill_length)
            if self.running and self.blocks.free_pages - need < watermark:
                break
            if not self.blocks.try_hold(request.request_id, request.prefill_length):
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            admitted.append(request)
            n = min(request.prefill_length, token_budget)
            chunks.append((request, n))
            token_budget -= n
        return chunks, admitted
