"""`engram train`: train on the default (or given) corpus and report validation loss."""

from __future__ import annotations

import argparse
import copy

from engram.config import load_config
from engram_cli.main import add_config_args


def register(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt")
    parser.add_argument(
        "--compare-baseline", action="store_true",
        help="also train the same backbone without Engram on the same tokens and print both losses",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engram.data import prepare_data
    from trainer.local import train_local

    cfg = load_config(args.preset, args.config, args.overrides)
    data = prepare_data(cfg)
    tok, vocab, dataset = data
    print(f"corpus: {dataset.train.size:,} train / {dataset.val.size:,} val tokens; vocab {vocab.vocab_size} "
          f"-> {vocab.size} after compression ({100 * vocab.ratio:.1f}% smaller)")
    result = train_local(cfg, data=data, resume=args.resume, label="engram" if cfg.engram.enabled else "baseline")
    print(f"validation loss {result.final_val_loss:.4f} ({result.tokens_per_s:,.0f} tokens/s); "
          f"checkpoint {result.checkpoint}")
    if args.compare_baseline and cfg.engram.enabled:
        base_cfg = copy.deepcopy(cfg)
        base_cfg.engram.enabled = False
        base_cfg.train.out_dir = cfg.train.out_dir.rstrip("/") + "-baseline"
        base = train_local(base_cfg, data=data, label="baseline")
        gain = (base.final_val_loss - result.final_val_loss) / base.final_val_loss
        print(f"\n{'model':<10} {'val loss':>9}\n{'baseline':<10} {base.final_val_loss:>9.4f}\n"
              f"{'engram':<10} {result.final_val_loss:>9.4f}\nEngram: {100 * gain:+.2f}% lower validation loss")
    return 0
