"""`engram cluster init|status|rebalance`: the control plane from the command line.

    engram cluster init --shards 4 [--force]
    engram cluster status
    engram cluster rebalance --shards 3        # or --add 3 / --remove 1
    engram cluster load runs/latest/checkpoint.pt   # a trained model's tables into the shards
    engram cluster import CKPT_DIR              # fp8 Engram tensors of a safetensors checkpoint (V4.1 naming)
    engram cluster export OUT_DIR               # ... and back out, in the same format
All take --preset/--config/--set; `cluster.redis_url` and `cluster.namespace` pick the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from engram.config_args import add_config_args


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="store the layout and an even slot map (epoch 1)")
    add_config_args(init)
    init.add_argument(
        "--shards", type=int, default=None, help="shards to spread the slots over (default: cluster.num_shards)"
    )
    init.add_argument("--force", action="store_true", help="wipe an initialised namespace first")
    status = sub.add_parser("status", help="table of shards: address, liveness, slots, rows, RAM")
    add_config_args(status)
    status.add_argument("--timeout-s", type=float, default=3.0, help="per-shard Stats deadline")
    reb = sub.add_parser("rebalance", help="move slots when shards join or leave (lookups go on)")
    add_config_args(reb)
    group = reb.add_mutually_exclusive_group(required=True)
    group.add_argument("--shards", type=int, help="target: shards 0..N-1 own the slots")
    group.add_argument("--add", type=int, nargs="+", help="shard ids that join (must be running)")
    group.add_argument("--remove", type=int, nargs="+", help="shard ids that leave")
    load = sub.add_parser("load", help="load a trained checkpoint's Engram tables into the running shards")
    add_config_args(load)
    load.add_argument(
        "checkpoint",
        help="a checkpoint.pt written by `engram train` (local or the Ray run's final "
        "one), or a Ray step directory holding shards.json",
    )
    load.add_argument(
        "--name",
        default=None,
        help="checkpoint name the slot files get under cluster.checkpoint_dir, which the shards share "
        "(default: load-<checkpoint file stem>); a re-run with the same name resumes",
    )
    load.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp = sub.add_parser("import", help="stream fp8 Engram tables of a safetensors checkpoint into the shards")
    add_config_args(imp)
    imp.add_argument(
        "directory",
        help="checkpoint directory: *.safetensors (+ model.safetensors.index.json) holding "
        "layers.{L}.engram.embed.weight (F8_E4M3) and .scale (F8_E8M0)",
    )
    imp.add_argument(
        "--dir",
        default=None,
        help="checkpoint name of the slot files under cluster.checkpoint_dir "
        "(its last path part; default import-<name>); a re-run resumes there",
    )
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    exp = sub.add_parser("export", help="write the Engram tables as an fp8 safetensors checkpoint")
    add_config_args(exp)
    exp.add_argument("directory", help="output directory (one file per Engram layer + model.safetensors.index.json)")
    exp.add_argument("--chunk-rows", type=int, default=1 << 16, help="rows per lookup while reading the tables")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engram.config import load_config
    from services.control import ControlPlaneUnavailable

    cfg = load_config(args.preset, args.config, args.overrides)
    from engram_cli.cmd_cluster_io import export_tables, import_tables

    action = {
        "init": _init,
        "status": _status,
        "rebalance": _rebalance,
        "load": _load,
        "import": import_tables,
        "export": export_tables,
    }[args.action]
    try:
        return asyncio.run(action(cfg, args))
    except ControlPlaneUnavailable as exc:
        print(
            f"engram cluster {args.action}: {exc}\n(is Redis running at cluster.redis_url? "
            "`engram up` starts a local cluster)",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:
        print(f"engram cluster {args.action}: {exc}", file=sys.stderr)
        return 1


def _control(cfg: Any) -> Any:
    from services.control import ControlPlane

    return ControlPlane.from_config(cfg)


async def _init(cfg: Any, args: argparse.Namespace) -> int:
    cp = _control(cfg)
    try:
        shards = args.shards or cfg.cluster.num_shards
        smap = await cp.init_cluster(cfg, num_shards=shards, force=args.force)
        print(
            f"initialised cluster {cp.namespace!r} at {cp.url}: epoch {smap.epoch}, "
            f"{cfg.cluster.num_slots} slots over {shards} shards"
        )
        return 0
    finally:
        await cp.close()


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


async def _status(cfg: Any, args: argparse.Namespace) -> int:
    from services.client import ShardClient, ShardError

    cp = _control(cfg)
    try:
        layout = await cp.config()
        smap = await cp.slot_map()
        records = {r.shard_id: r for r in await cp.shards()}
        stats: dict[int, Any] = {}
        if records:
            client = await ShardClient.connect(cp, timeout_s=args.timeout_s, security=cfg.security)
            try:
                alive = [i for i, r in records.items() if r.alive]
                stats = await client.stats(alive, timeout_s=args.timeout_s, errors="return") if alive else {}
            finally:
                await client.close()
        owned: dict[int, int] = {}
        for owner in smap.owners:
            owned[owner] = owned.get(owner, 0) + 1
        n_alive = sum(r.alive for r in records.values())
        print(
            f"cluster {cp.namespace!r} at {cp.url}: epoch {smap.epoch}, {len(smap.owners)} slots, "
            f"{len(records)} shards registered ({n_alive} alive), tables {layout.engram.layer_ids}"
        )
        print(
            f"{'shard':>5}  {'address':<22} {'alive':<5} {'slots':>5} {'rows':>12} {'RAM':>12}  {'last seen':<10} note"
        )
        now = time.time()
        for shard_id in sorted(set(records) | set(owned)):
            rec = records.get(shard_id)
            st = stats.get(shard_id)
            note = ""
            rows = ram = None
            if isinstance(st, ShardError):
                note = f"Stats failed: {st.code.name}"
            elif st is not None:
                rows = sum(t.num_rows for t in st.tables)
                ram = st.rss_bytes
                if st.epoch != smap.epoch:
                    note = f"shard at epoch {st.epoch}"
            elif rec is not None:
                rows, ram = rec.info.get("rows"), rec.info.get("rss_bytes")
            if rec is None:
                note = "owns slots but never registered"
            seen = "-" if rec is None else f"{max(0.0, now - rec.last_seen):.1f} s ago"
            print(
                f"{shard_id:>5}  {(rec.address if rec else '-'):<22} {('yes' if rec and rec.alive else 'no'):<5} "
                f"{owned.get(shard_id, 0):>5} {('-' if rows is None else f'{rows:,}'):>12} {_mib(ram):>12}  "
                f"{seen:<10} {note}"
            )
        return 0
    finally:
        await cp.close()


async def _rebalance(cfg: Any, args: argparse.Namespace) -> int:
    from services.control.rebalance import rebalance

    cp = _control(cfg)
    try:
        report = await rebalance(
            cp, num_shards=args.shards, add=args.add or (), remove=args.remove or (), security=cfg.security
        )
        moved = sum(len(s) for s in report.moves.values())
        print(
            f"epoch {report.old_epoch} -> {report.new_epoch}: moved {moved} slots "
            f"({report.bytes_sent / 2**20:,.1f} MiB) in {report.seconds:.1f} s"
        )
        for (src, dst), slots in sorted(report.moves.items()):
            print(f"  shard {src} -> shard {dst}: {len(slots)} slots")
        return 0
    finally:
        await cp.close()


async def _load(cfg: Any, args: argparse.Namespace) -> int:
    """Slot files from the checkpoint's tables (resumable), then Restore on every shard."""
    from pathlib import Path

    from tqdm import tqdm

    from engram.config import config_from_dict
    from services.client import ShardClient
    from services.client.table_load import checkpoint_tables, write_table_slots
    from services.shard.checkpoint import checkpoint_dir
    from services.shard.errors import ShardError

    if (Path(args.checkpoint) / "shards.json").is_file():  # a Ray step: the shards wrote the slot files
        return await _restore_manifest(cfg, Path(args.checkpoint) / "shards.json")
    if not Path(args.checkpoint).is_file():
        raise ValueError(f"checkpoint {args.checkpoint} does not exist")
    name = args.name or f"load-{Path(args.checkpoint).stem}"
    try:
        directory = checkpoint_dir(cfg.cluster.checkpoint_dir, name)  # this process's root: the shards' one
    except ShardError as exc:
        raise ValueError(exc.message) from None
    ck_cfg, tables, step = checkpoint_tables(args.checkpoint)
    trained = config_from_dict(ck_cfg)
    cp = _control(cfg)
    try:
        client = await ShardClient.connect(cp, timeout_s=cfg.cluster.lookup_timeout_s, security=cfg.security)
        try:
            if client.cfg.engram != trained.engram:
                raise ValueError(
                    f"the cluster {cp.namespace!r} holds another Engram layout than the checkpoint's "
                    "engram config (re-init the cluster with the checkpoint's config)"
                )
            layouts = client.layouts
            num_slots = client.cfg.cluster.num_slots
            total = sum(min(num_slots, lay.num_rows) for lay in layouts.values())
            bar = tqdm(total=total, unit="slot", desc="slot files", disable=args.no_progress)
            skipped = 0

            def tick(table: int, slot: int, was_skipped: bool) -> None:
                nonlocal skipped
                skipped += was_skipped
                bar.update(1)

            manifest = await asyncio.to_thread(
                write_table_slots,
                tables,
                layouts,
                directory=directory,
                name=name,
                num_slots=num_slots,
                kind=client.cfg.cluster.optimizer,
                step=step,
                on_slot=tick,
            )
            bar.close()
            result = await client.restore(manifest)
        finally:
            await client.close()
    finally:
        await cp.close()
    print(
        f"loaded {len(layouts)} tables of {args.checkpoint} (step {step}) into cluster {cp.namespace!r}: "
        f"{result['slots_restored']} slots restored from checkpoint {name} ({skipped} slot files reused)"
    )
    return 0


async def _restore_manifest(cfg: Any, path: Any) -> int:
    import json

    from services.client import ShardClient

    cp = _control(cfg)
    try:
        client = await ShardClient.connect(cp, timeout_s=cfg.cluster.lookup_timeout_s, security=cfg.security)
        try:
            result = await client.restore(json.loads(path.read_text()))
        finally:
            await client.close()
    finally:
        await cp.close()
    print(f"restored {result['slots_restored']} slots at step {result['step']} from {path}")
    return 0
