"""The generation engine: continuous batching over a paged KV cache.

One asyncio task drives steps; each step runs on the model thread (never on the event loop):

1. **reap** -- cancelled sequences leave the batch and their KV blocks go back to the pool.
2. **admit** -- waiting sequences join (FIFO) while there are running slots
   (`worker.max_running`) and free blocks for their whole window; at admission the hash ids
   of the window are computed and its row lookups issued, so they fly while other work runs.
3. **schedule** -- a token budget per step (`worker.max_step_tokens`): every sequence with one
   uncached token (decode) costs 1; what is left goes to prefill chunks, oldest sequence
   first (a long prompt is split over steps, so decodes never stall behind it).
4. **run** -- one ragged `engram.decode.extend` for the decode batch and one for the chunks;
   a decode sequence that needs a block the pool does not have preempts the newest
   sequence (its blocks are freed; it re-prefills later from its tokens).
5. **sample** -- sequences whose window is cached sample a token, detokenise it
   incrementally, check eot, stop strings and max_tokens; the next token's rows (its N-grams
   only: Hn rows per Engram layer) are issued at once, before the next step's layer 0.

A window that reaches `model.max_seq_len` shifts: the last half is kept and re-prefilled.
Events go back to each sequence's asyncio queue on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections import deque

import torch

from engram.decode import OutOfBlocks, extend, make_pool
from engram.model import EngramLM
from worker.engine import sample_next
from worker.prefetch import PrefetchPipeline, RowsUnavailable
from worker.sequence import ErrorEvent, RowTicket, Sequence, TokenEvent

log = logging.getLogger("engram.worker")
Event = TokenEvent | ErrorEvent


class Overloaded(RuntimeError):
    """The waiting queue is full (worker.max_queue)."""


class Scheduler:
    def __init__(
        self,
        model: EngramLM,
        *,
        pipeline: PrefetchPipeline | None,
        num_tokens: int,
        eot: int | None,
        executor: cf.ThreadPoolExecutor,
        kv_cache_mb: float,
        block_size: int,
        max_step_tokens: int,
        max_running: int,
        max_queue: int,
    ) -> None:
        self.model, self.pipeline, self.num_tokens, self.eot = model, pipeline, num_tokens, eot
        self.executor = executor
        device = next(model.parameters()).device
        self.pool = make_pool(model, budget_bytes=int(kv_cache_mb * 2**20), block_size=block_size, device=device)
        self.block_bytes = self.pool.k[:, :block_size].nbytes * 2
        self.max_step_tokens, self.max_running, self.max_queue = max_step_tokens, max_running, max_queue
        self.max_len = model.cfg.model.max_seq_len
        self.ngram = model.cfg.engram.max_ngram_size
        self.pad = model.cfg.engram.pad_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.counters = {
            "steps": 0,
            "prefill_tokens": 0,
            "decode_tokens": 0,
            "preemptions": 0,
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
        }

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engram-scheduler")

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"{len(self.waiting)} requests are waiting (worker.max_queue={self.max_queue})")
            self.waiting.append(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        if not seq.finished:
            seq.cancelled = True
            self._wake.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            try:
                events = await loop.run_in_executor(self.executor, self.step)
            except Exception:  # noqa: BLE001 - a bug in a step must not kill the engine
                log.exception("engine step failed")
                events = self._fail_all("engine step failed (see the server log)")
            for seq, ev in events:
                seq.events.put_nowait(ev)
            if not events:
                await asyncio.sleep(0.002)  # nothing could run (e.g. only cancelled sequences left)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------ model-thread side

    def _fail_all(self, message: str) -> list[tuple[Sequence, Event]]:
        out: list[tuple[Sequence, Event]] = []
        for seq in list(self.running):
            out.append((seq, ErrorEvent(message)))
            self._retire(seq)
        return out

    def _retire(self, seq: Sequence) -> None:
        seq.state.release(self.pool)
        seq.ticket = None
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)

    def _issue(self, seqs: list[Sequence], contexts: torch.Tensor, keep_last: int | None) -> None:
        """Hash the contexts (B, T) and issue their lookups; each sequence gets a ticket."""
        if self.pipeline is None or self.model.indexer is None:
            return
        with torch.no_grad():
            rows = self.model.indexer.global_rows(contexts.to(self.model.indexer.compress.device))
        indices = {}
        for layer, g in rows.items():  # (B, T, Hn)
            g = g if keep_last is None else g[:, -keep_last:]
            unique, inverse = torch.unique(g, return_inverse=True)
            indices[layer] = (unique, inverse)
        handle = self.pipeline.issue(indices)
        for b, seq in enumerate(seqs):
            seq.ticket = RowTicket(handle, b, len(seq.tokens) - (keep_last or len(seq.tokens)))

    def _reap(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self._retire(seq)
            self.counters["cancelled"] += 1
        with self._lock:
            dropped = [s for s in self.waiting if s.cancelled]
            for s in dropped:
                self.waiting.remove(s)
                s.finished = True
        self.counters["cancelled"] += len(dropped)

    def _admit(self) -> None:
        while len(self.running) < self.max_running:
            with self._lock:
                if not self.waiting:
                    return
                seq = self.waiting[0]
                need = self.pool.blocks_for(len(seq.tokens))
                if self.pool.free_blocks - need < 1 and self.running:  # keep a spare block for decodes
                    return
                self.waiting.popleft()
            seq.state.reserve(self.pool, len(seq.tokens))
            self.running.append(seq)
            self._issue([seq], torch.tensor([seq.tokens]), None)

    def _preempt_for(self, seq: Sequence) -> bool:
        """Free blocks for `seq` by preempting the newest other sequence; False if none left."""
        victims = [s for s in self.running if s is not seq]
        if not victims:
            return False
        victim = victims[-1]
        victim.state.release(self.pool)
        victim.ticket = None
        self.running.remove(victim)
        with self._lock:
            self.waiting.appendleft(victim)
        self.counters["preemptions"] += 1
        return True

    def step(self) -> list[tuple[Sequence, Event]]:
        self._reap()
        self._admit()
        self.counters["steps"] += 1
        budget = self.max_step_tokens
        decode: list[Sequence] = []
        for seq in [s for s in self.running if s.pending == 1][:budget]:
            while True:
                try:
                    seq.state.reserve(self.pool, len(seq.tokens))
                    decode.append(seq)
                    break
                except OutOfBlocks:
                    if not self._preempt_for(seq):
                        raise
        decode = [s for s in decode if s in self.running]
        budget -= len(decode)
        chunks: list[tuple[Sequence, int]] = []
        for seq in [s for s in self.running if s.pending > 1]:  # oldest first, as long as the budget lasts
            if budget <= 0:
                break
            chunks.append((seq, min(seq.pending, budget)))
            budget -= chunks[-1][1]
        out: list[tuple[Sequence, Event]] = []
        ready: list[tuple[Sequence, torch.Tensor]] = []
        if decode:
            ready += self._run(decode, [1] * len(decode), out)
            self.counters["decode_tokens"] += len(decode)
        if chunks:
            ready += self._run([c[0] for c in chunks], [c[1] for c in chunks], out)
            self.counters["prefill_tokens"] += sum(c[1] for c in chunks)
        next_rows: list[Sequence] = []
        for seq, logits_V in ready:
            ev = self._sample(seq, logits_V)
            out.append((seq, ev))
            if ev.finish_reason is not None:
                self._retire(seq)
                self.counters["finished"] += 1
            elif len(seq.tokens) > self.max_len:  # context shift: keep the last half, re-prefill it
                seq.tokens = seq.tokens[-(self.max_len // 2) :]
                seq.state.release(self.pool)
                seq.state.reserve(self.pool, len(seq.tokens))
                self._issue([seq], torch.tensor([seq.tokens]), None)
            else:
                next_rows.append(seq)
        if next_rows:  # the new tokens' N-grams only, issued before the next step's layer 0
            ctx = torch.full((len(next_rows), self.ngram), self.pad, dtype=torch.long)  # (B, N) left-padded
            for b, seq in enumerate(next_rows):
                tail = seq.tokens[-self.ngram :]
                ctx[b, self.ngram - len(tail) :] = torch.tensor(tail)
            self._issue(next_rows, ctx, 1)
        return out

    def _run(
        self, seqs: list[Sequence], counts: list[int], out: list[tuple[Sequence, Event]]
    ) -> list[tuple[Sequence, torch.Tensor]]:
        """One extend; -> [(seq, next-token logits (V,))] of sequences whose window is now cached."""
        starts = [s.state.length for s in seqs]
        n = max(counts)

        def rows_at(layer: int) -> torch.Tensor:
            parts = []
            for s, a, c in zip(seqs, starts, counts):
                assert s.ticket is not None
                r = s.ticket.rows(layer, a, c)  # (c, Hn, dh)
                parts.append(torch.cat([r, r.new_zeros((n - c, *r.shape[1:]))]) if c < n else r)
            return torch.stack(parts)  # (B, n, Hn, dh)

        want_gates = any(s.options.return_gates for s in seqs)
        gates: dict[int, torch.Tensor] = {}
        knock = [s.options.knockout for s in seqs]
        try:
            with torch.inference_mode():
                logits = extend(
                    self.model,
                    self.pool,
                    [s.state for s in seqs],
                    new_ids=[s.tokens[a : a + c] for s, a, c in zip(seqs, starts, counts)],
                    rows_at=rows_at if self.pipeline is not None else None,
                    knockout=torch.tensor(knock) if any(knock) else None,
                    gates_out=gates if want_gates else None,
                )  # (B, n, V)
        except (RowsUnavailable, OutOfBlocks, ValueError) as exc:
            for s in seqs:
                out.append((s, ErrorEvent(str(exc), unavailable=isinstance(exc, RowsUnavailable))))
                self._retire(s)
                self.counters["failed"] += 1
            return []
        ready = []
        for b, (s, c) in enumerate(zip(seqs, counts)):
            if s.pending == 0:
                if s.options.return_gates:
                    s.last_gates = {layer: g[b, c - 1].tolist() for layer, g in gates.items()}
                ready.append((s, logits[b, c - 1]))
        return ready

    def _sample(self, seq: Sequence, logits_V: torch.Tensor) -> TokenEvent:
        p = seq.params
        logp = torch.log_softmax(logits_V[: self.num_tokens].float(), dim=-1)  # (V_tok,)
        token = sample_next(logp, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, generator=seq.gen)
        top = None
        if p.logprobs is not None:
            vals, ids = torch.topk(logp, min(p.logprobs, logp.numel())) if p.logprobs else (logp[:0], logp[:0])
            top = [(int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist())]
        seq.generated.append(token)
        seq.tokens.append(token)
        is_eot = token == self.eot and not p.ignore_eot
        text, stopped = ("", False) if is_eot else seq.stop_text.push(seq.detok.push(token))
        finish = None
        if is_eot or stopped:
            finish = "stop"
        elif len(seq.generated) >= p.max_tokens:
            finish = "length"
            text += seq.stop_text.flush()
        return TokenEvent(
            index=len(seq.generated) - 1,
            token_id=token,
            text=text,
            logprob=float(logp[token]),
            top_logprobs=top,
            gates=seq.last_gates if seq.options.return_gates else None,
            finish_reason=finish,
        )

    def stats(self) -> dict[str, float]:
        return {
            **self.counters,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_blocks_total": self.pool.num_blocks,
            "kv_blocks_used": self.pool.used_blocks,
            "kv_bytes_used": self.pool.used_blocks * self.block_bytes,
            "at": time.time(),
        }
