"""`engram cluster import DIR` / `engram cluster export DIR`: fp8 Engram tables and safetensors.

    engram cluster import /ckpt/DeepSeek-V4.1-Flash --preset v41flash   # check, hash, slot files, restore, verify
    engram cluster export /tmp/engram-out --preset v41flash             # one file per layer + the index

The work is in services/client/engram_safetensors.py; this prints progress and the sha256 of
every tensor. An interrupted import resumes from the slot directory's progress file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any


@contextlib.asynccontextmanager
async def _fp8_client(cfg: Any) -> AsyncIterator[tuple[Any, Any]]:
    """(control plane, ShardClient reading fp8 rows) of the configured cluster; both closed on the way out."""
    from services.client import ShardClient
    from services.control import ControlPlane

    cp = ControlPlane.from_config(cfg)
    try:
        client = await ShardClient.connect(
            cp, wire_dtype="fp8", timeout_s=cfg.cluster.lookup_timeout_s, security=cfg.security
        )
        try:
            yield cp, client
        finally:
            await client.close()
    finally:
        await cp.close()


@contextlib.contextmanager
def _progress(args: argparse.Namespace, *, total: int, **bar: Any) -> Iterator[Any]:
    """A tqdm bar (off with --no-progress), closed on the way out."""
    from tqdm import tqdm

    progress = tqdm(total=total, disable=args.no_progress, **bar)
    try:
        yield progress
    finally:
        progress.close()


async def import_tables(cfg: Any, args: argparse.Namespace) -> int:
    from services.client.engram_safetensors import CheckpointError, import_checkpoint
    from services.shard.checkpoint import checkpoint_dir

    async with _fp8_client(cfg) as (cp, client):
        name = Path(args.directory).resolve().name
        # a checkpoint name directly under this process's cluster.checkpoint_dir (the shards' root)
        slot_dir = checkpoint_dir(cfg.cluster.checkpoint_dir, Path(args.dir).name if args.dir else f"import-{name}")
        total = sum(min(client.cfg.cluster.num_slots, lay.num_rows) for lay in client.layouts.values())
        with _progress(args, total=total, unit="slot", desc="slot files") as bar:
            try:
                report = await import_checkpoint(
                    client, args.directory, slot_dir=slot_dir, on_slot=lambda t, s, skipped: bar.update(1)
                )
            except CheckpointError as exc:
                print(
                    f"engram cluster import: {exc}\nnothing was imported; the shards serve what they served",
                    file=sys.stderr,
                )
                return 1
    for tensor, digest in sorted(report.digests.items()):
        print(f"sha256 {digest}  {tensor}")
    print(
        f"imported {report.rows:,} rows of {len(client.layouts)} tables from {args.directory} into cluster "
        f"{cp.namespace!r}: {report.slots_restored} slots restored from {slot_dir} ({report.slots_reused} slot "
        f"files reused); read back: every tensor's sha256 matches the checkpoint"
    )
    return 0


async def export_tables(cfg: Any, args: argparse.Namespace) -> int:
    from services.client.engram_safetensors import CheckpointError, export_checkpoint

    if args.chunk_rows < 1:
        raise ValueError(f"--chunk-rows: must be >= 1, got {args.chunk_rows}")
    async with _fp8_client(cfg) as (_, client):
        total = sum(lay.num_rows for lay in client.layouts.values())
        with _progress(args, total=total, unit="row", unit_scale=True, desc="export") as bar:
            try:
                report = await export_checkpoint(client, args.directory, chunk_rows=args.chunk_rows, on_rows=bar.update)
            except CheckpointError as exc:
                print(f"engram cluster export: {exc}", file=sys.stderr)
                return 1
    for tensor, digest in sorted(report.digests.items()):
        print(f"sha256 {digest}  {tensor}")
    print(
        f"exported {report.rows:,} rows of {len(client.layouts)} tables to {args.directory}: {', '.join(report.files)}"
    )
    return 0
