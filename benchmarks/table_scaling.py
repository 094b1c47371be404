"""More memory at fixed compute: validation loss against the number of Engram table rows.

The paper's "infinite memory" curve: the backbone, the tokens, the seed and the step FLOPs
stay fixed; only `engram.table_size_per_ngram` (rows per head) changes. A dense baseline
(Engram off) is the left end.

    OMP_NUM_THREADS=1 python -m benchmarks.table_scaling --preset tiny --set train.steps=300 \
        --set train.eval_every=300 --set train.eval_batches=16 --set train.batch_size=8 \
        --set train.seq_len=64 --sizes 61,251,1009,4001,16001,64007 \
        --json benchmarks/results/table_scaling_tiny-2core.json --plot docs/table_scaling.png

Prints a table, writes JSON and a PNG (loss vs total rows, log x-axis).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.machine import machine_info, write_report  # noqa: E402
from engram.config import Config, load_config  # noqa: E402
from engram.data import prepare_data  # noqa: E402
from engram.layout import table_layouts  # noqa: E402
from trainer.local import train_local  # noqa: E402


def total_rows(cfg: Config) -> int:
    return sum(t.num_rows for t in table_layouts(cfg.engram).values())


def run(cfg: Config, sizes: list[int], out_dir: Path) -> dict:
    data = prepare_data(cfg)
    points = []
    for size in [0, *sizes]:  # 0 -> the dense baseline (Engram off)
        c = copy.deepcopy(cfg)
        c.engram.enabled = size > 0
        if size:
            c.engram.table_size_per_ngram = [size] * (c.engram.max_ngram_size - 1)
        c.train.out_dir = str(out_dir / f"rows-{size}")
        t0 = time.perf_counter()
        r = train_local(c, data=data, label=f"size {size}" if size else "dense")
        point = {
            "table_size_per_ngram": size,
            "total_rows": total_rows(c) if size else 0,
            "final_val_loss": r.final_val_loss,
            "step_flops": r.step_flops,
            "tokens_per_s": r.tokens_per_s,
            "wall_s": time.perf_counter() - t0,
        }
        points.append(point)
        print(f"  rows/head {size:>8}: val loss {r.final_val_loss:.4f} ({point['wall_s']:.0f} s)", flush=True)
    return {
        "config": cfg.to_dict(),
        "machine": machine_info(),
        "points": points,
        "load_avg_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
    }


def plot(report: dict, path: Path) -> None:
    pts = [p for p in report["points"] if p["total_rows"]]
    dense = next((p for p in report["points"] if not p["total_rows"]), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["total_rows"] for p in pts], [p["final_val_loss"] for p in pts], "o-", label="Engram")
    if dense is not None:
        ax.axhline(dense["final_val_loss"], color="gray", ls="--", label="dense baseline (no Engram)")
    ax.set_xscale("log")
    ax.set_xlabel("Engram table rows (all layers and heads)")
    ax.set_ylabel("validation loss (nats/token)")
    cfg = report["config"]
    ax.set_title(f"fixed compute, {cfg['train']['steps']} steps, d_model={cfg['model']['d_model']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict) -> None:
    print(f"\n{'rows/head':>10} {'total rows':>12} {'val loss':>9} {'step GFLOPs':>12} {'wall s':>8}")
    for p in report["points"]:
        print(
            f"{p['table_size_per_ngram'] or 'dense':>10} {p['total_rows']:>12,} {p['final_val_loss']:>9.4f} "
            f"{p['step_flops'] / 1e9:>12.3f} {p['wall_s']:>8.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--sizes", default="251,1009,4001,16001,64007", help="rows per head, comma-separated")
    parser.add_argument("--out", default="runs/table_scaling")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, help="write the PNG here (default: OUT/table_scaling.png)")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.config, args.overrides)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 2:
        parser.error(f"--sizes: need integers >= 2, got {args.sizes!r}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = run(cfg, sizes, out_dir)
    print_table(report)
    plot(report, Path(args.plot) if args.plot else out_dir / "table_scaling.png")
    if args.json:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
