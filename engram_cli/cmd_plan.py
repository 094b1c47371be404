"""`engram plan`: how many shards and how much RAM a layout needs (arithmetic in engram/capacity.py).

    engram plan --layout v41flash --format fp8 --shards 2 --replicas 2 --node-ram 512GiB \
        --gpu-tokens-per-s 20000 --workers 8 --cache 8GiB
    engram plan --layout v41flash ... --json
    engram plan --layout v41flash --tokenizer path/to/hf-model   # also checks |V'| against the layout
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from engram.capacity import MEASURED_ZIPF, PlanInput, parse_bytes, plan
from engram.config import PRESETS, ConfigError, load_config


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout", default="v41flash", help=f"a preset whose engram section is the layout ({', '.join(PRESETS)})"
    )
    parser.add_argument("--format", default=None, help="storage format fp32|bf16|fp16|fp8 (default: the layout's)")
    parser.add_argument("--wire", default=None, help="wire format of lookups (default: the storage format)")
    parser.add_argument("--shards", type=int, required=True, help="partitions of the slot space")
    parser.add_argument("--replicas", type=int, default=1, help="shard processes (nodes) per partition")
    parser.add_argument("--node-ram", required=True, help="RAM of one node, e.g. 512GiB")
    parser.add_argument("--ram-reserve", type=float, default=0.1, help="fraction of node RAM not for rows")
    parser.add_argument("--gpu-tokens-per-s", type=float, required=True, help="tokens/s of one GPU worker")
    parser.add_argument("--workers", type=int, default=1, help="GPU workers reading the tables")
    parser.add_argument("--cache", default="0", help="hot-row cache per worker, e.g. 8GiB (rows kept in bf16)")
    parser.add_argument(
        "--zipf",
        type=float,
        default=None,
        help=f"Zipf exponent of row popularity (default: measured per order {MEASURED_ZIPF})",
    )
    parser.add_argument("--optimizer", default="none", help="none | adam | adagrad: optimizer state beside rows")
    parser.add_argument("--slots", type=int, default=None, help="slots (default: the preset's cluster.num_slots)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json or HF folder: report |V'| and check it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _rate(n: float) -> str:
    return f"{n / 1e9:,.3f} GB/s ({8 * n / 1e9:,.2f} Gbit/s)"


def print_plan(p: dict[str, Any], layout: str) -> None:
    lay, sh, w, cl = p["layout"], p["shard"], p["worker"], p["cluster"]
    print(
        f"layout {layout}: {lay['row_format']} storage, {lay['wire_format']} on the wire, optimizer {lay['optimizer']}"
    )
    print(f"{'layer':>6} {'rows':>15} {'dim':>5} {'heads':>5} {'B/row':>6} {'bytes':>14}")
    for t in lay["tables"]:
        print(
            f"{t['layer']:>6} {t['rows']:>15,} {t['dim']:>5} {t['heads']:>5} {t['stored_row_bytes']:>6} "
            f"{_gib(t['bytes']):>14}"
        )
    print(f"{'total':>6} {lay['total_rows']:>15,} {'':>5} {'':>5} {'':>6} {_gib(lay['total_bytes']):>14}")
    rows = [
        ("shards x replicas (nodes)", f"{cl['num_shards']} x {cl['replicas']} = {cl['nodes']}"),
        ("bytes per shard (largest)", f"{sh['bytes_max']:,} B = {_gib(sh['bytes_max'])}"),
        ("usable RAM per node", f"{_gib(sh['usable_ram_bytes'])} of {_gib(sh['node_ram_bytes'])}"),
        ("fits", "yes" if sh["fits"] else "NO"),
        ("all replicas store", _gib(cl["stored_bytes_all_replicas"])),
        ("rows per token", f"{w['rows_per_token']}"),
        ("cache hit rate per worker", f"{100 * w['cache_hit_rate']:.1f}% ({w['cache_rows_per_table']:,} rows/table)"),
        ("rows/s per shard replica", f"{sh['rows_per_s']:,.0f}"),
        ("bytes/s per shard replica", _rate(sh["bytes_per_s"])),
        ("rows/s per worker (misses)", f"{w['rows_per_s']:,.0f}"),
        ("network per worker, in", _rate(w["rx_bytes_per_s"])),
        ("network per worker, out (ids)", _rate(w["tx_bytes_per_s"])),
    ]
    print()
    for k, v in rows:
        print(f"  {k:<31} {v}")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.layout)
    try:
        node_ram = parse_bytes(args.node_ram)
        cache = parse_bytes(args.cache)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.tokenizer:
        from engram.tokenizer import compressed_vocab_for, load_tokenizer

        cfg.tokenizer.path = args.tokenizer
        cv = compressed_vocab_for(cfg, load_tokenizer(args.tokenizer))  # refuses a different |V'|
        print(
            f"tokenizer {args.tokenizer}: |V| = {cv.vocab_size:,} -> |V'| = {cv.size:,} (the layout's: "
            f"{cfg.engram.compressed_vocab_size or 'any'})"
        )
    zipf = dict(MEASURED_ZIPF) if args.zipf is None else {2: args.zipf}
    try:
        p = plan(
            PlanInput(
                engram=cfg.engram,
                row_format=args.format or cfg.engram.row_format,
                wire_format=args.wire,
                num_shards=args.shards,
                replicas=args.replicas,
                node_ram_bytes=node_ram,
                ram_reserve=args.ram_reserve,
                gpu_tokens_per_s=args.gpu_tokens_per_s,
                workers=args.workers,
                cache_bytes_per_worker=cache,
                zipf=zipf,
                optimizer=args.optimizer,
                num_slots=args.slots or cfg.cluster.num_slots,
            )
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.json:
        print(json.dumps({"layout_preset": args.layout, **p}, indent=2))
    else:
        print_plan(p, args.layout)
    return 0 if p["shard"]["fits"] else 1
