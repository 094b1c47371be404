"""The model-worker gRPC server (engram.worker.v1.ModelWorker): Score and streamed Generate.

grpc.aio on uvloop. Handlers only validate and translate: the model runs on one worker
thread behind a `DynamicBatcher`, so concurrent requests (including every decode step of
every open Generate stream) share forward passes. Standard grpc.health.v1 service. SIGTERM
or SIGINT -> health NOT_SERVING, `server.stop(grace)` lets in-flight requests finish, then
the batcher and the row source close. Errors: bad input -> INVALID_ARGUMENT naming the field;
rows that miss the lookup deadline -> UNAVAILABLE; the server keeps serving either way.

Generation past the context keeps the last `model.max_seq_len` tokens as the window.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from engram.config import Config
from engram.tokenizer import eot_id
from proto.worker.v1 import worker_pb2, worker_pb2_grpc
from worker.batcher import DynamicBatcher
from worker.engine import ModelEngine, Work, sample_next
from worker.prefetch import RowsUnavailable

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


class TextDelta:
    """Incremental detokenisation: emit only complete characters."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.emitted = tok, ""
        self.ids: list[int] = []

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


class ModelWorkerServicer(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self, *, engine: ModelEngine, batcher: DynamicBatcher, tok: Tokenizer, cfg: Config) -> None:
        self.engine, self.batcher, self.tok, self.cfg = engine, batcher, tok, cfg
        self.limit = cfg.model.max_seq_len
        try:
            self.eot: int | None = eot_id(tok)
        except ValueError:
            self.eot = None

    async def _run(self, work: Work, context: grpc.aio.ServicerContext) -> torch.Tensor:
        try:
            return await self.batcher.submit(work)
        except RowsUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Engram rows unavailable: {exc}")
            raise  # unreachable: abort raises

    async def Score(self, request: worker_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> worker_pb2.ScoreResponse:
        try:
            ids, truncated = fit_context(
                self.tok.encode(request.text).ids if request.text else [],
                field="text", limit=self.limit, truncate=request.truncate,
            )
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        logp_TV = await self._run(Work(ids=ids, last_only=False), context)
        targets = torch.tensor(ids[1:], dtype=torch.long)
        lps = logp_TV[:-1].gather(1, targets.unsqueeze(1)).squeeze(1) if len(ids) > 1 else torch.empty(0)  # (T-1,)
        return worker_pb2.ScoreResponse(
            token_ids=ids, logprobs=lps.tolist(), total_logprob=float(lps.sum()), num_tokens=len(ids),
            truncated=truncated,
        )

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        try:
            params = sampling_of(request, max_new_tokens_limit=self.cfg.worker.max_new_tokens)
            ids, _ = fit_context(
                self.tok.encode(request.prompt).ids if request.prompt else [],
                field="prompt", limit=self.limit, truncate=request.truncate,
            )
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        gen = torch.Generator().manual_seed(params.seed)
        text = TextDelta(self.tok)
        produced, finished = 0, False
        try:
            for i in range(params.max_new_tokens):
                logp_V = await self._run(Work(ids=ids[-self.limit:], last_only=True), context)
                token = sample_next(
                    logp_V, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, generator=gen
                )
                ids.append(token)
                produced += 1
                is_eot = token == self.eot and not request.ignore_eot
                last = is_eot or i == params.max_new_tokens - 1
                finished = last
                yield worker_pb2.GenerateResponse(
                    token_id=token, text=text.push(token), logprob=float(logp_V[token]), index=i,
                    finish_reason=("eot" if is_eot else "length") if last else "",
                )
                if last:
                    break
        finally:  # a client cancel arrives as CancelledError or GeneratorExit at an await/yield
            if not finished:
                log.info("generate stopped after %d of %d tokens (cancelled or failed)", produced, params.max_new_tokens)
                print(f"CANCELLED tokens={produced}", flush=True)


async def serve(
    engine: ModelEngine, tok: Tokenizer, cfg: Config, *, host: str = "127.0.0.1", port: int | None = None,
    grace_s: float = 10.0, stop: asyncio.Event | None = None,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT), then shut down cleanly."""
    batcher: DynamicBatcher = DynamicBatcher(
        engine.logprobs, max_batch=cfg.worker.max_batch, timeout_ms=cfg.worker.batch_timeout_ms
    )
    batcher.start()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    worker_pb2_grpc.add_ModelWorkerServicer_to_server(
        ModelWorkerServicer(engine=engine, batcher=batcher, tok=tok, cfg=cfg), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{cfg.worker.port if port is None else port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY address={host}:{bound} row_source={cfg.worker.row_source}", flush=True)
    await stop.wait()
    print("STOPPING", flush=True)
    await health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING
    await server.stop(grace_s)  # in-flight requests finish within the grace period
    await batcher.close()
    engine.close()
    print(f"STOPPED batches={engine.batches} sequences={engine.sequences}", flush=True)


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
