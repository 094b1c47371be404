"""Build a serving engine from a checkpoint: config overrides, row source, tokenizer."""

from __future__ import annotations

import dataclasses
import sys
from typing import cast

import torch
from tokenizers import Tokenizer

from engram.config import Config, ConfigError, SecurityConfig, load_config
from engram.engram_layer import LocalEngramTable
from engram.model import EngramLM
from engram.precision import configure_tf32
from engram.tokenizer import eot_id
from worker.engine import ModelEngine
from worker.prefetch import LoopThread, RemoteRowSource, RowSource

SERVING_SECTIONS = ("worker", "cluster", "security")


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A trained model's config with `section.field=value` overrides of the serving sections only."""
    for item in overrides:
        section = item.partition("=")[0].strip().partition(".")[0]
        if section not in SERVING_SECTIONS:
            raise ConfigError(
                f"{item.partition('=')[0]}: a trained checkpoint fixes the model; only "
                f"{' and '.join(s + '.*' for s in SERVING_SECTIONS)} can be overridden when serving"
            )
    base = dataclasses.replace(cfg, security=SecurityConfig())  # the trainer's certificates are not this server's
    return load_config(overrides=overrides, base=base)


def remote_source(cfg: Config, device: torch.device) -> RowSource:
    """The memory shards of `cfg.cluster` through `services.client.ShardClient` on a loop thread."""
    from services.client import ShardClient
    from services.control import ControlPlane

    loop = LoopThread()

    async def connect() -> ShardClient:
        control = ControlPlane.from_config(cfg)
        client = await ShardClient.connect(
            control,
            wire_dtype=cfg.cluster.wire_dtype,
            timeout_s=cfg.cluster.lookup_timeout_s,
            # where this process runs (not the cluster's stored layout): which row path it may take
            row_path=cfg.cluster.row_path,
            host_id=cfg.cluster.host_id,
            shm_dir=cfg.cluster.shm_dir,
            security=cfg.security,
        )
        if client.cfg.engram != cfg.engram:
            await client.close()
            await control.close()
            raise ConfigError(
                f"cluster.namespace: the cluster {cfg.cluster.namespace!r} at {cfg.cluster.redis_url} holds tables "
                f"of another Engram layout than this model's engram config"
            )
        return client

    try:
        client = loop.call(connect(), timeout=cfg.cluster.lookup_timeout_s + 30)
    except BaseException:
        loop.close()
        raise

    async def close() -> None:
        await client.close()
        await client.control.close()

    return RemoteRowSource(
        client, loop=loop, device=device, timeout_s=cfg.cluster.lookup_timeout_s, owns=close, owns_loop=True
    )


def check_and_drop_local_tables(model: EngramLM, source: RowSource, *, sample: int = 64) -> list[int]:
    """Compare a sample of each table's rows with the shards', then free the local tables.

    -> the layers whose shard rows differ from the checkpoint's (the cluster holds other
    weights, e.g. a fresh cluster for a locally trained model); the caller warns.
    """
    differ: list[int] = []
    gen = torch.Generator().manual_seed(0)
    for name, module in model.tables.items():
        table = cast(LocalEngramTable, module)
        layer = int(name)
        n, dim = int(table.weight.shape[0]), int(table.weight.shape[1])
        ids = torch.unique(torch.randint(0, n, (min(sample, n),), generator=gen))  # (S,)
        landed = source.issue({layer: ids})[layer].result(timeout=60)
        if landed.event is not None:  # the rows are still being copied on the lander's side stream
            landed.event.synchronize()
        remote = landed.rows.float().cpu()
        if not torch.allclose(remote, table.weight.detach()[ids].float().cpu(), rtol=1e-2, atol=1e-2):
            differ.append(layer)
        table.weight = torch.nn.Parameter(table.weight.new_empty((0, dim)))  # the rows live on the shards
    return differ


def build_engine(model: EngramLM, cfg: Config, tok: Tokenizer) -> ModelEngine:
    device = torch.device(cfg.worker.device)
    configure_tf32(device, cfg.train.tf32)
    model = model.to(device)
    source = None
    if cfg.worker.row_source == "remote" and model.indexer is not None:
        source = remote_source(cfg, device)
        differ = check_and_drop_local_tables(model, source)
        if differ:
            print(
                f"WARNING: the cluster's rows of Engram layers {differ} differ from this checkpoint's tables; "
                "serving with the cluster's rows (load the trained tables into the shards to serve this model)",
                file=sys.stderr,
                flush=True,
            )
    try:
        pad = eot_id(tok)
    except ValueError:
        pad = 0
    return ModelEngine(model, cfg, source=source, pad_id=pad, num_tokens=tok.get_vocab_size())


def load_engine(checkpoint: str, overrides: list[str]) -> tuple[ModelEngine, Tokenizer, Config]:
    from engram.checkpoint import load_model

    model, cfg, tok_json = load_model(checkpoint)
    cfg = with_overrides(cfg, overrides)
    tok = Tokenizer.from_str(tok_json)
    return build_engine(model, cfg, tok), tok, cfg
