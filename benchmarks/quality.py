"""Does memory help? The same backbone with and without Engram, same tokens, same seed.

    python -m benchmarks.quality --preset cpu --json benchmarks/results/quality_cpu-2core.json
    engram bench quality --preset small --set train.device=cuda

Prints a table (validation loss, step FLOPs, tokens/s), writes JSON, a loss-curve PNG and a
gate heatmap PNG (gate value per token and Engram layer for a sample text).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_info
from engram.config import Config, load_config
from engram.data import prepare_data
from trainer.checkpoint import load_model
from trainer.local import train_local
from trainer.plots import plot_gate_heatmap, plot_loss_curves

SAMPLE_TEXT = (
    "def __init__(self, *args, **kwargs):\n"
    "    raise NotImplementedError(\"subclasses must override\")\n"
    "if __name__ == \"__main__\":\n"
    "    import sys\n"
)


def gate_heatmap(checkpoint: str, text: str, path: Path) -> dict:
    """Gate alpha per token and Engram layer for `text` (averaged over hyper-connection branches)."""
    from tokenizers import Tokenizer

    model, cfg, tok_json = load_model(checkpoint)
    tok = Tokenizer.from_str(tok_json)
    ids = tok.encode(text).ids[: cfg.model.max_seq_len]
    with torch.no_grad():
        _, _, gates = model(torch.tensor([ids]), return_gates=True)
    layers = sorted(gates)
    grid = np.stack([gates[layer][0].mean(dim=-1).numpy() for layer in layers])  # (L, T)
    tokens = [tok.decode([i]) for i in ids]
    plot_gate_heatmap(tokens, grid, layers, path, title="Engram gate per token")
    top = np.argsort(-grid.mean(axis=0))[:8]
    return {"tokens": tokens, "gates": grid.round(4).tolist(), "layers": layers,
            "highest": [(tokens[i], float(grid[:, i].mean())) for i in sorted(top)]}


def run(cfg: Config, out_dir: Path) -> dict:
    data = prepare_data(cfg)
    runs = {}
    results = {}
    for name, enabled in (("baseline", False), ("engram", True)):
        c = copy.deepcopy(cfg)
        c.engram.enabled = enabled
        c.train.out_dir = str(out_dir / name)
        t0 = time.perf_counter()
        r = train_local(c, data=data, label=name)
        runs[name] = r
        results[name] = {
            "final_val_loss": r.final_val_loss, "val_losses": r.val_losses, "step_flops": r.step_flops,
            "tokens_per_s": r.tokens_per_s, "wall_s": time.perf_counter() - t0,
        }
    plot_loss_curves(runs, out_dir / "loss_curves.png")
    base, eng = results["baseline"], results["engram"]
    summary = {
        "relative_val_loss_reduction": (base["final_val_loss"] - eng["final_val_loss"]) / base["final_val_loss"],
        "step_flops_ratio": eng["step_flops"] / base["step_flops"],
        "compression_ratio": runs["engram"].compression_ratio,
    }
    gates = gate_heatmap(runs["engram"].checkpoint, SAMPLE_TEXT, out_dir / "gate_heatmap.png")
    return {"config": cfg.to_dict(), "machine": machine_info(), "results": results, "summary": summary,
            "gates": gates, "date": time.strftime("%Y-%m-%d")}


def print_table(report: dict) -> None:
    print(f"\n{'model':<10} {'val loss':>9} {'step GFLOPs':>12} {'tokens/s':>10} {'wall s':>8}")
    for name, r in report["results"].items():
        print(f"{name:<10} {r['final_val_loss']:>9.4f} {r['step_flops'] / 1e9:>12.2f} "
              f"{r['tokens_per_s']:>10,.0f} {r['wall_s']:>8.1f}")
    s = report["summary"]
    print(f"\nEngram lowers validation loss by {100 * s['relative_val_loss_reduction']:.2f}% "
          f"at {s['step_flops_ratio']:.3f}x the step FLOPs; tokenizer compression saves "
          f"{100 * s['compression_ratio']:.1f}% of the vocabulary.")
    print("gate fires most on:", ", ".join(f"{t!r}={g:.2f}" for t, g in report["gates"]["highest"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, args.config, args.overrides)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = run(cfg, out_dir)
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}; plots in {out_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
