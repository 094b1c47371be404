"""The model-worker gRPC server (engram.worker.v1.ModelWorker): Score and streamed Generate.

grpc.aio on uvloop. Handlers only validate and translate; the model runs on one model
thread: Score through a `DynamicBatcher` (whole-sequence log-probs), Generate through the
`Scheduler` (paged KV cache, continuous batching; see worker/scheduler.py), which the
OpenAI-compatible HTTP API (worker/http_api.py, `worker.http_port`) shares. Standard
grpc.health.v1 service. SIGTERM or SIGINT -> health NOT_SERVING, `server.stop(grace)` lets
in-flight requests finish, then the engine and the row source close. Errors: bad input ->
INVALID_ARGUMENT naming the field; rows that miss the lookup deadline -> UNAVAILABLE; a full
queue -> RESOURCE_EXHAUSTED; each with an ErrorInfo reason (services/errors.py). The server
keeps serving either way.

Generation past the context shifts the window: the last half is kept and re-prefilled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from engram.config import Config
from engram.tokenizer import eot_id
from proto.worker.v1 import worker_pb2, worker_pb2_grpc
from services.errors import Code, Reason, ShardError, abort
from services.grpc_options import enable_reflection
from services.security import tls
from services.security.interceptor import server_interceptors
from worker.batcher import DynamicBatcher
from worker.engine import ModelEngine, Work
from worker.prefetch import RowsUnavailable
from worker.scheduler import Overloaded, Scheduler
from worker.sequence import EngramOptions, ErrorEvent, SamplingParams, Sequence

log = logging.getLogger("engram.worker")
SERVICE_NAME = "engram.worker.v1.ModelWorker"
DEFAULT_MAX_NEW_TOKENS = 32


class BadRequest(ValueError):
    """A request field is invalid; the message names it."""


@dataclass(slots=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int


async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, *, reason: Reason) -> None:
    """Abort with a rich status (code, message, ErrorInfo reason), as the shards do (services/errors.py)."""
    await abort(context, ShardError(code, message, reason=reason))


def sampling_of(req: worker_pb2.GenerateRequest, *, max_new_tokens_limit: int) -> Sampling:
    """Validate and fill defaults of a GenerateRequest's sampling fields."""
    n = req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    if not 0 < n <= max_new_tokens_limit:
        raise BadRequest(f"max_new_tokens: must be in 1..{max_new_tokens_limit} (worker.max_new_tokens), got {n}")
    temperature = req.temperature if req.HasField("temperature") else 1.0
    if not temperature >= 0 or temperature != temperature or temperature == float("inf"):
        raise BadRequest(f"temperature: must be a finite number >= 0 (0 = greedy), got {temperature}")
    top_p = req.top_p if req.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p: must be in (0, 1], got {top_p}")
    if req.top_k < 0:
        raise BadRequest(f"top_k: must be >= 0 (0 = off), got {req.top_k}")
    seed = req.seed if req.HasField("seed") else int.from_bytes(os.urandom(8), "little") >> 1
    return Sampling(max_new_tokens=n, temperature=temperature, top_k=req.top_k, top_p=top_p, seed=seed)


def fit_context(ids: list[int], *, field: str, limit: int, truncate: bool) -> tuple[list[int], bool]:
    if not ids:
        raise BadRequest(f"{field}: empty")
    if len(ids) <= limit:
        return ids, False
    if not truncate:
        raise BadRequest(
            f"{field}: {len(ids)} tokens exceed the context of {limit} tokens (model.max_seq_len); "
            f"shorten it or set truncate=true to keep the last {limit}"
        )
    return ids[-limit:], True


class ModelWorkerServicer(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(
        self, *, engine: ModelEngine, batcher: DynamicBatcher, scheduler: Scheduler, tok: Tokenizer, cfg: Config
    ) -> None:
        self.engine, self.batcher, self.scheduler, self.tok, self.cfg = engine, batcher, scheduler, tok, cfg
        self.limit = cfg.model.max_seq_len

    async def _encode(self, text: str) -> list[int]:
        """Tokenise off the event loop."""
        if not text:
            return []
        return list((await asyncio.get_running_loop().run_in_executor(None, self.tok.encode, text)).ids)

    async def _run(self, work: Work, context: grpc.aio.ServicerContext) -> torch.Tensor:
        try:
            return await self.batcher.submit(work)
        except RowsUnavailable as exc:
            await _refuse(context, Code.UNAVAILABLE, f"Engram rows unavailable: {exc}", reason=Reason.ROWS_UNAVAILABLE)
            raise  # unreachable: abort raises

    async def Score(
        self, request: worker_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ScoreResponse:
        try:
            ids, truncated = fit_context(
                await self._encode(request.text),
                field="text",
                limit=self.limit,
                truncate=request.truncate,
            )
        except BadRequest as exc:
            await _refuse(context, Code.INVALID_ARGUMENT, str(exc), reason=Reason.BAD_REQUEST)
        logp_TV = await self._run(Work(ids=ids, last_only=False), context)
        targets = torch.tensor(ids[1:], dtype=torch.long)
        lps = logp_TV[:-1].gather(1, targets.unsqueeze(1)).squeeze(1) if len(ids) > 1 else torch.empty(0)  # (T-1,)
        return worker_pb2.ScoreResponse(
            token_ids=ids,
            logprobs=lps.tolist(),
            total_logprob=float(lps.sum()),
            num_tokens=len(ids),
            truncated=truncated,
        )

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        try:
            params = sampling_of(request, max_new_tokens_limit=self.cfg.worker.max_new_tokens)
            ids, _ = fit_context(
                await self._encode(request.prompt),
                field="prompt",
                limit=self.limit,
                truncate=request.truncate,
            )
        except BadRequest as exc:
            await _refuse(context, Code.INVALID_ARGUMENT, str(exc), reason=Reason.BAD_REQUEST)
        seq = Sequence(
            prompt_ids=ids,
            tok=self.tok,
            loop=asyncio.get_running_loop(),
            options=EngramOptions(),
            params=SamplingParams(
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                seed=params.seed,
                ignore_eot=request.ignore_eot,
            ),
        )
        try:
            self.scheduler.submit(seq)
        except Overloaded as exc:
            await _refuse(context, Code.RESOURCE_EXHAUSTED, f"server overloaded: {exc}", reason=Reason.OVERLOADED)
        produced, finished = 0, False
        try:
            while True:
                ev = await seq.events.get()
                if isinstance(ev, ErrorEvent):
                    if ev.unavailable:
                        text = f"Engram rows unavailable: {ev.message}"
                        await _refuse(context, Code.UNAVAILABLE, text, reason=Reason.ROWS_UNAVAILABLE)
                    await _refuse(context, Code.INTERNAL, ev.message, reason=Reason.INTERNAL)
                    return  # unreachable: abort raises
                produced += 1
                finished = ev.finish_reason is not None
                reason = {"stop": "eot", "length": "length"}.get(ev.finish_reason or "", "")
                yield worker_pb2.GenerateResponse(
                    token_id=ev.token_id,
                    text=ev.text,
                    logprob=ev.logprob,
                    index=ev.index,
                    finish_reason=reason,
                )
                if finished:
                    break
        finally:  # a client cancel arrives as CancelledError or GeneratorExit at an await/yield
            self.scheduler.cancel(seq)
            if not finished:
                log.info(
                    "generate stopped after %d of %d tokens (cancelled or failed)", produced, params.max_new_tokens
                )
                print(f"CANCELLED tokens={produced}", flush=True)


async def serve(
    engine: ModelEngine,
    tok: Tokenizer,
    cfg: Config,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    grace_s: float = 10.0,
    stop: asyncio.Event | None = None,
    http_port: int | None = None,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT), then shut down cleanly."""
    w = cfg.worker
    tls.check_bind(host, cfg.security, what=f"the worker's gRPC on {host}")
    if (w.http_port if http_port is None else http_port) >= 0:  # HTTPS with TLS on; else loopback only
        tls.check_bind(host, cfg.security, what=f"the worker's HTTP API on {host}")
    model_thread = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-model")  # the one model thread
    batcher: DynamicBatcher = DynamicBatcher(
        engine.logprobs, max_batch=w.max_batch, timeout_ms=w.batch_timeout_ms, executor=model_thread
    )
    batcher.start()
    scheduler = Scheduler(
        engine.model,
        pipeline=engine.pipeline,
        num_tokens=engine.num_tokens,
        eot=eot_or_none(tok),
        executor=model_thread,
        kv_cache_mb=w.kv_cache_mb,
        block_size=w.kv_block_size,
        max_step_tokens=w.max_step_tokens,
        max_running=w.max_running,
        max_queue=w.max_queue,
    )
    scheduler.start()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=server_interceptors(cfg.security))
    worker_pb2_grpc.add_ModelWorkerServicer_to_server(
        ModelWorkerServicer(engine=engine, batcher=batcher, scheduler=scheduler, tok=tok, cfg=cfg), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, SERVICE_NAME)
    bound, _ = tls.add_port(server, f"{host}:{cfg.worker.port if port is None else port}", cfg.security)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http: Any = None
    port_http = w.http_port if http_port is None else http_port
    if port_http >= 0:
        from worker.http_server import HttpServer  # starlette + uvicorn only when the HTTP API is on

        http = HttpServer(scheduler=scheduler, tok=tok, cfg=cfg, host=host, port=port_http, grace_s=grace_s)
        await http.start()
    http_note = f" http={host}:{http.port} http_scheme={http.scheme}" if http is not None else ""
    print(f"READY address={host}:{bound}{http_note} row_source={cfg.worker.row_source}", flush=True)
    await stop.wait()
    print("STOPPING", flush=True)
    await health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING
    stops = [server.stop(grace_s)] + ([http.stop()] if http is not None else [])
    await asyncio.gather(*stops)  # in-flight requests finish within the grace period
    await scheduler.close()
    await batcher.close()
    model_thread.shutdown(wait=True)
    engine.close()
    print(f"STOPPED batches={engine.batches} sequences={engine.sequences}", flush=True)


def eot_or_none(tok: Tokenizer) -> int | None:
    try:
        return eot_id(tok)
    except ValueError:
        return None


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
