"""`engram cluster import DIR` / `engram cluster export DIR`: fp8 Engram tables and safetensors.

    engram cluster import /ckpt/DeepSeek-V4.1-Flash --preset v41flash   # check, hash, slot files, restore, verify
    engram cluster export /tmp/engram-out --preset v41flash             # one file per layer + the index

The work is in services/client/engram_safetensors.py; this prints progress and the sha256 of
every tensor. An interrupted import resumes from the slot directory's progress file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


async def import_tables(cfg: Any, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from services.client import ShardClient
    from services.client.engram_safetensors import CheckpointError, import_checkpoint
    from services.control import ControlPlane

    cp = ControlPlane.from_config(cfg)
    try:
        client = await ShardClient.connect(
            cp, wire_dtype="fp8", timeout_s=cfg.cluster.lookup_timeout_s, security=cfg.security
        )
        try:
            name = Path(args.directory).resolve().name
            # a checkpoint name directly under this process's cluster.checkpoint_dir (the shards' root)
            from services.shard.checkpoint import checkpoint_dir

            slot_dir = checkpoint_dir(cfg.cluster.checkpoint_dir, Path(args.dir).name if args.dir else f"import-{name}")
            total = sum(min(client.cfg.cluster.num_slots, lay.num_rows) for lay in client.layouts.values())
            bar = tqdm(total=total, unit="slot", desc="slot files", disable=args.no_progress)
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
            finally:
                bar.close()
        finally:
            await client.close()
    finally:
        await cp.close()
    for tensor, digest in sorted(report.digests.items()):
        print(f"sha256 {digest}  {tensor}")
    print(
        f"imported {report.rows:,} rows of {len(client.layouts)} tables from {args.directory} into cluster "
        f"{cp.namespace!r}: {report.slots_restored} slots restored from {slot_dir} ({report.slots_reused} slot "
        f"files reused); read back: every tensor's sha256 matches the checkpoint"
    )
    return 0


async def export_tables(cfg: Any, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from services.client import ShardClient
    from services.client.engram_safetensors import CheckpointError, export_checkpoint
    from services.control import ControlPlane

    if args.chunk_rows < 1:
        raise ValueError(f"--chunk-rows: must be >= 1, got {args.chunk_rows}")
    cp = ControlPlane.from_config(cfg)
    try:
        client = await ShardClient.connect(
            cp, wire_dtype="fp8", timeout_s=cfg.cluster.lookup_timeout_s, security=cfg.security
        )
        try:
            total = sum(lay.num_rows for lay in client.layouts.values())
            bar = tqdm(total=total, unit="row", unit_scale=True, desc="export", disable=args.no_progress)
            try:
                report = await export_checkpoint(client, args.directory, chunk_rows=args.chunk_rows, on_rows=bar.update)
            except CheckpointError as exc:
                print(f"engram cluster export: {exc}", file=sys.stderr)
                return 1
            finally:
                bar.close()
        finally:
            await client.close()
    finally:
        await cp.close()
    for tensor, digest in sorted(report.digests.items()):
        print(f"sha256 {digest}  {tensor}")
    print(
        f"exported {report.rows:,} rows of {len(client.layouts)} tables to {args.directory}: {', '.join(report.files)}"
    )
    return 0
