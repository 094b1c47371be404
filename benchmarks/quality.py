"""Does memory help? The same backbone with and without Engram, same tokens, paired over seeds.

    python -m benchmarks.quality --preset cpu --seeds 3 --json benchmarks/results/quality_cpu-2core.json
    python -m benchmarks.quality --preset cpu --seeds 3 --variants baseline,engram,engram-frozen,dense-same-params
    python -m benchmarks.quality --seed-list 1235 --json a.json ...; --merge a.json b.json --json all.json
    engram bench quality --preset small --set train.device=cuda

Variants (every one trains on the same tokens, seed by seed):
  baseline            the dense backbone, no Engram
  engram              the backbone with Engram (the configuration as given)
  engram-frozen       Engram with its tables frozen at initialisation: projections, gates and conv
                      train, the rows never move -- separates learned memory from the extra projection
  dense-same-params   no Engram, the SwiGLU hidden width grown until the dense model has as many
                      parameters as the Engram model *including its tables* (width, not depth: each
                      layer's MLP gets the extra parameters; its step FLOPs are reported)

Seed k of --seeds N sets train.seed and engram.seed to (train.seed + k). Per variant the report
gives each seed's relative validation-loss reduction against that seed's baseline, their mean,
sample std, min/max and a 95% t-interval for the mean. The JSON is rewritten after every run,
so an interrupted benchmark keeps what it finished. Also writes loss-curve and gate heatmap PNGs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_info
from benchmarks.seed_stats import summarize
from engram.checkpoint import load_model
from engram.config import Config, load_config
from engram.data import prepare_data
from engram.model import EngramLM
from trainer.local import train_local
from trainer.plots import plot_gate_heatmap, plot_loss_curves

VARIANTS = ("baseline", "engram", "engram-frozen", "dense-same-params")
DEFAULT_VARIANTS = ("baseline", "engram")

SAMPLE_TEXT = (
    "def __init__(self, *args, **kwargs):\n"
    '    raise NotImplementedError("subclasses must override")\n'
    'if __name__ == "__main__":\n'
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
    plot_gate_heatmap(tokens, grid, layers, path=path, title="Engram gate per token")
    top = np.argsort(-grid.mean(axis=0))[:8]
    return {
        "tokens": tokens,
        "gates": grid.round(4).tolist(),
        "layers": layers,
        "highest": [(tokens[i], float(grid[:, i].mean())) for i in sorted(top)],
    }


def param_counts(cfg: Config, compress_lookup: np.ndarray) -> dict:
    """{total, tables}: parameters of the model `cfg` builds (tied embeddings counted once)."""
    model = EngramLM(cfg, compress_lookup if cfg.engram.enabled else None)
    tables = sum(p.numel() for p in model.tables.parameters())
    return {"total": sum(p.numel() for p in model.parameters()), "tables": tables}


def same_params_hidden(cfg: Config, compress_lookup: np.ndarray) -> int:
    """SwiGLU hidden width at which the dense model (no Engram) matches the Engram model's parameters."""
    m = cfg.model
    dense = copy.deepcopy(cfg)
    dense.engram.enabled = False
    base_hidden = m.mlp_hidden or 64 * math.ceil(8 * m.d_model / 3 / 64)
    extra = param_counts(cfg, compress_lookup)["total"] - param_counts(dense, compress_lookup)["total"]
    return base_hidden + round(extra / (3 * m.d_model * m.n_layer))  # gate_up (2 D H) + down (H D) per layer


def variant_config(cfg: Config, name: str, seed: int, *, compress_lookup: np.ndarray) -> Config:
    c = copy.deepcopy(cfg)
    c.train.seed = c.engram.seed = seed
    if name == "baseline":
        c.engram.enabled = False
    elif name == "engram-frozen":
        c.engram.freeze_table = True
    elif name == "dense-same-params":
        c.model.mlp_hidden = same_params_hidden(c, compress_lookup)
        c.engram.enabled = False
    elif name != "engram":
        raise ValueError(f"variant: unknown {name!r} (known: {', '.join(VARIANTS)})")
    return c


def seed_order(variants: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Baseline/Engram pairs seed by seed first (the headline), then each extra variant over the seeds."""
    pairs = [v for v in ("baseline", "engram") if v in variants]
    order = [(v, s) for s in seeds for v in pairs]
    return order + [(v, s) for v in variants if v not in pairs for s in seeds]


def summarise(report: dict) -> None:
    """Fill report['summary'] from the runs finished so far (in place)."""
    runs, seeds = report["runs"], report["seeds"]
    summary = {}
    for name in report["variants"]:
        if name == "baseline":
            continue
        done = [s for s in seeds if str(s) in runs.get(name, {}) and str(s) in runs.get("baseline", {})]
        if not done:
            continue
        gains = [
            (runs["baseline"][str(s)]["final_val_loss"] - runs[name][str(s)]["final_val_loss"])
            / runs["baseline"][str(s)]["final_val_loss"]
            for s in done
        ]
        first = runs[name][str(done[0])]
        summary[name] = {
            "seeds": done,
            "relative_val_loss_reduction": dict(zip(map(str, done), gains)),
            "stats": summarize(gains),
            "step_flops_ratio": first["step_flops"] / runs["baseline"][str(done[0])]["step_flops"],
            "params": first["params"],
        }
    report["summary"] = summary


def run(cfg: Config, out_dir: Path, *, seeds: list[int], variants: list[str], json_path: Path | None) -> dict:
    data = prepare_data(cfg)
    lookup = data[1].lookup
    report: dict = {
        "config": cfg.to_dict(),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": seeds,
        "variants": variants,
        "runs": {},
        "summary": {},
        "compression_ratio": data[1].ratio,
    }
    curves = {}
    for name, seed in seed_order(variants, seeds):
        c = variant_config(cfg, name, seed, compress_lookup=lookup)
        c.train.out_dir = str(out_dir / f"seed{seed}" / name)
        t0 = time.perf_counter()
        r = train_local(c, data=data, label=f"{name} seed {seed}")
        report["runs"].setdefault(name, {})[str(seed)] = {
            "final_val_loss": r.final_val_loss,
            "val_losses": r.val_losses,
            "step_flops": r.step_flops,
            "tokens_per_s": r.tokens_per_s,
            "wall_s": time.perf_counter() - t0,
            "params": param_counts(c, lookup),
            "mlp_hidden": c.model.mlp_hidden,
            "tokens": c.train.steps * c.train.batch_size * c.train.seq_len,
            "checkpoint": r.checkpoint,
        }
        if seed == seeds[0]:
            curves[name] = r
        summarise(report)
        if json_path is not None:
            write_json(report, json_path)
    plot_loss_curves(curves, out_dir / "loss_curves.png")
    if "engram" in report["runs"]:
        report["gates"] = gate_heatmap(
            report["runs"]["engram"][str(seeds[0])]["checkpoint"], SAMPLE_TEXT, out_dir / "gate_heatmap.png"
        )
    return report


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)


def print_table(report: dict) -> None:
    print(
        f"\n{'model':<18} {'seed':>5} {'val loss':>9} {'params':>10} {'step GFLOPs':>12} {'tokens/s':>10} {'wall s':>8}"
    )
    for name, per_seed in report["runs"].items():
        for seed, r in per_seed.items():
            print(
                f"{name:<18} {seed:>5} {r['final_val_loss']:>9.4f} {r['params']['total']:>10,} "
                f"{r['step_flops'] / 1e9:>12.2f} {r['tokens_per_s']:>10,.0f} {r['wall_s']:>8.1f}"
            )
    print(f"\nrelative validation-loss reduction vs the baseline ({len(report['seeds'])} seeds asked):")
    print(
        f"{'model':<18} {'n':>2} {'mean %':>8} {'std %':>7} {'min %':>7} {'max %':>7} {'95% CI %':>17} {'FLOPs x':>8}"
    )
    for name, s in report["summary"].items():
        st = s["stats"]
        ci = f"[{100 * st['ci95'][0]:+.2f}, {100 * st['ci95'][1]:+.2f}]" if st["ci95"] else "(one seed)"
        print(
            f"{name:<18} {st['n']:>2} {100 * st['mean']:>+8.2f} {100 * st['std']:>7.2f} {100 * st['min']:>+7.2f} "
            f"{100 * st['max']:>+7.2f} {ci:>17} {s['step_flops_ratio']:>8.3f}"
        )
    if "gates" in report:
        print("gate fires most on:", ", ".join(f"{t!r}={g:.2f}" for t, g in report["gates"]["highest"]))


def merge_reports(paths: list[Path]) -> dict:
    """Reports of the same configuration run in pieces (seeds or variants split across processes) -> one."""
    reports = [json.loads(p.read_text()) for p in paths]
    first = reports[0]
    for p, r in zip(paths[1:], reports[1:]):
        a = {k: v for k, v in first["config"].items() if k != "train"}
        b = {k: v for k, v in r["config"].items() if k != "train"}
        ta = {k: v for k, v in first["config"]["train"].items() if k not in ("seed", "out_dir", "progress")}
        tb = {k: v for k, v in r["config"]["train"].items() if k not in ("seed", "out_dir", "progress")}
        if a != b or ta != tb:
            raise ValueError(f"{p}: another configuration than {paths[0]}; only runs of one configuration merge")
    merged = {**first, "runs": {}, "seeds": [], "variants": [], "merged_from": [str(p) for p in paths]}
    for r in reports:
        for name, per_seed in r["runs"].items():
            merged["runs"].setdefault(name, {}).update(per_seed)
        merged["seeds"] = sorted(set(merged["seeds"]) | set(r["seeds"]))
        merged["variants"] += [v for v in r["variants"] if v not in merged["variants"]]
        if "gates" in r and "gates" not in merged:
            merged["gates"] = r["gates"]
    merged["variants"] = [v for v in VARIANTS if v in merged["variants"]]
    summarise(merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=3, help="paired runs per variant (train.seed + 0..N-1)")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds instead of --seeds")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}; gains need the baseline "
        "(in this run or in a report merged with --merge)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="REPORT.json",
        help="no training: merge reports of one configuration (seeds split across processes)",
    )
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--json", default=None, help="write the report here (rewritten after every run)")
    args = parser.parse_args(argv)
    json_path = Path(args.json) if args.json else None
    if args.merge:
        report = merge_reports([Path(p) for p in args.merge])
        print_table(report)
        if json_path is not None:
            write_json(report, json_path)
            print(f"wrote {json_path}")
        return 0
    if args.seeds < 1:
        parser.error(f"--seeds: must be >= 1, got {args.seeds}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none)'} (known: {', '.join(VARIANTS)})")
    cfg = load_config(args.preset, args.config, args.overrides)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        seeds = (
            [int(x) for x in args.seed_list.split(",")]
            if args.seed_list
            else [cfg.train.seed + k for k in range(args.seeds)]
        )
    except ValueError:
        parser.error(f"--seed-list: expected comma-separated integers, got {args.seed_list!r}")
    report = run(cfg, out_dir, seeds=seeds, variants=variants, json_path=json_path)
    print_table(report)
    if json_path is not None:
        write_json(report, json_path)
        print(f"wrote {json_path}; plots in {out_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
