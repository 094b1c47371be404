"""The OpenAI-compatible HTTP API (Starlette on uvicorn, same event loop as the gRPC server).

    POST /v1/completions   stream=false -> one JSON; stream=true -> server-sent events, then `data: [DONE]`
    GET  /v1/models        the one served model (worker.model_name)
    GET  /health           200 while serving, 503 while shutting down
    GET  /metrics          Prometheus text: requests, tokens, TTFT, inter-token latency, KV blocks

Errors are `{"error": {"message", "type", "param", "code"}}` with 400 (a field is wrong: the
message names it), 404 (unknown model), 429 (queue full, worker.max_queue), 503 (rows
unavailable or shutting down). A client that disconnects mid-stream cancels its sequence:
its KV blocks go back to the pool at the next engine step.

The engine extension `engram: {"knockout": true, "return_gates": true}` switches the Engram
branch off for the request and/or returns, per generated token, `{layer: [alpha per branch]}`
(the gate at the input position that produced the token) in `choices[0].engram.gates`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import Tokenizer

from worker import openai_protocol as proto
from worker.scheduler import Overloaded, Scheduler
from worker.sequence import ErrorEvent, Sequence, TokenEvent

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class EngineMetrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("engram_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("engram_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("engram_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram(
            "engram_time_to_first_token_seconds", "request arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "engram_inter_token_latency_seconds", "between tokens of one stream", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "engram_e2e_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        r.register(_EngineCollector(scheduler))  # type: ignore[arg-type]


class _EngineCollector:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Any:
        s = self.scheduler.stats()
        for name, key, doc in (
            ("engram_num_requests_running", "running", "sequences in the running batch"),
            ("engram_num_requests_waiting", "waiting", "requests waiting for admission"),
            ("engram_kv_cache_blocks_total", "kv_blocks_total", "KV blocks in the pool (worker.kv_cache_mb)"),
            ("engram_kv_cache_blocks_used", "kv_blocks_used", "KV blocks owned by sequences"),
            ("engram_kv_cache_used_bytes", "kv_bytes_used", "bytes of the KV blocks in use"),
            ("engram_engine_steps", "steps", "engine steps run"),
            ("engram_preemptions", "preemptions", "sequences preempted for KV blocks"),
        ):
            yield GaugeMetricFamily(name, doc, value=float(s[key]))


class Api:
    def __init__(
        self,
        *,
        scheduler: Scheduler,
        tok: Tokenizer,
        model_name: str,
        max_seq_len: int,
        max_new_tokens: int,
        tok_executor: cf.ThreadPoolExecutor,
    ) -> None:
        self.scheduler, self.tok, self.model_name = scheduler, tok, model_name
        self.max_seq_len, self.max_new_tokens = max_seq_len, max_new_tokens
        self.num_tokens = tok.get_vocab_size()
        self.tok_executor = tok_executor
        self.metrics = EngineMetrics(scheduler)
        self.serving = True
        self.created = proto.now()

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one Api per process
    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ]
        )

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok" if self.serving else "stopping"}, status_code=200 if self.serving else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "engram",
                        "root": self.model_name,
                        "max_model_len": self.max_seq_len,
                    }
                ],
            }
        )

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(
            generate_latest(self.metrics.registry).decode(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @staticmethod
    def error(exc: proto.ApiError) -> Response:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def _sequence(self, request: Request) -> tuple[proto.CompletionRequest, Sequence]:
        if not self.serving:
            raise proto.ApiError(503, "the server is shutting down")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise proto.ApiError(400, f"request body: not valid JSON ({exc})") from None
        req = proto.parse_completion(
            body, model_name=self.model_name, max_new_tokens=self.max_new_tokens, num_tokens=self.num_tokens
        )
        loop = asyncio.get_running_loop()
        if req.prompt_ids is None:  # tokenisation off the event loop
            enc = await loop.run_in_executor(self.tok_executor, self.tok.encode, req.prompt_text)
            ids = list(enc.ids)
            if not ids:
                raise proto.ApiError(400, "prompt: encodes to no tokens", param="prompt")
        else:
            ids = req.prompt_ids
        if len(ids) > self.max_seq_len:
            raise proto.ApiError(
                400,
                f"prompt: this model's maximum context length is {self.max_seq_len} tokens "
                f"(model.max_seq_len), but the prompt has {len(ids)} tokens",
                param="prompt",
            )
        seq = Sequence(prompt_ids=ids, params=req.params, options=req.options, tok=self.tok, loop=loop)
        try:
            self.scheduler.submit(seq)
        except Overloaded as exc:
            self.metrics.requests.labels("rejected").inc()
            raise proto.ApiError(429, f"server overloaded: {exc}; retry later") from None
        self.metrics.prompt_tokens.inc(len(ids))
        return req, seq

    async def _events(self, seq: Sequence, request: Request | None = None) -> AsyncIterator[TokenEvent]:
        """Tokens of `seq` until it finishes; records TTFT/ITL; cancels the sequence if abandoned."""
        last = seq.submitted_at
        outcome = "cancelled"
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(seq.events.get(), 1.0)
                except TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if isinstance(ev, ErrorEvent):
                    outcome = "error"
                    raise proto.ApiError(503 if ev.unavailable else 500, ev.message)
                t = time.monotonic()
                (self.metrics.ttft if ev.index == 0 else self.metrics.itl).observe(t - last)
                last = t
                self.metrics.generation_tokens.inc()
                yield ev
                if ev.finish_reason is not None:
                    outcome = ev.finish_reason
                    self.metrics.e2e.observe(t - seq.submitted_at)
                    return
        finally:
            self.metrics.requests.labels(outcome).inc()
            self.scheduler.cancel(seq)  # a no-op once finished

    async def completions(self, request: Request) -> Response:
        try:
            req, seq = await self._sequence(request)
        except proto.ApiError as exc:
            return self.error(exc)
        cid, created = proto.completion_id(), proto.now()
        if req.stream:
            return StreamingResponse(
                self._stream(req, seq, cid, created=created),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        text, finish, gates = "", None, []
        lp = proto.LogprobsBuilder(self.token_text) if req.params.logprobs is not None else None
        n = 0
        try:
            async for ev in self._events(seq, request):
                if lp is not None:
                    lp.add(ev, len(text))
                text += ev.text
                n += 1
                finish = ev.finish_reason
                if ev.gates is not None:
                    gates.append({str(k): v for k, v in ev.gates.items()})
        except proto.ApiError as exc:
            return self.error(exc)
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": lp.whole() if lp else None,
            "finish_reason": finish,
        }
        if req.options.return_gates or req.options.knockout:
            choice["engram"] = {"knockout": req.options.knockout, "gates": gates if req.options.return_gates else None}
        return JSONResponse(
            proto.chunk(cid, created, self.model_name, choice=choice, usage=proto.usage_of(seq.prompt_len, n))
        )

    async def _stream(
        self, req: proto.CompletionRequest, seq: Sequence, cid: str, *, created: int
    ) -> AsyncIterator[str]:
        lp = proto.LogprobsBuilder(self.token_text) if req.params.logprobs is not None else None
        offset, n = 0, 0
        try:
            async for ev in self._events(seq):
                choice: dict[str, Any] = {
                    "index": 0,
                    "text": ev.text,
                    "logprobs": lp.add(ev, offset) if lp else None,
                    "finish_reason": ev.finish_reason,
                }
                if ev.gates is not None:
                    choice["engram"] = {"gates": {str(k): v for k, v in ev.gates.items()}}
                offset += len(ev.text)
                n += 1
                yield f"data: {json.dumps(proto.chunk(cid, created, self.model_name, choice=choice))}\n\n"
        except proto.ApiError as exc:  # the status line is sent already: the error goes in the stream
            yield f"data: {json.dumps(exc.body())}\n\n"
        if req.include_usage:
            yield f"data: {json.dumps(proto.chunk(cid, created, self.model_name, choice=None, usage=proto.usage_of(seq.prompt_len, n)))}\n\n"
        yield "data: [DONE]\n\n"
