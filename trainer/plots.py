"""Loss curves and the gate heatmap as PNG files (matplotlib, Agg backend).

matplotlib is imported on first use and is optional: without it (the offline GPU kit of
scripts/gpu_check.sh leaves its ~25 MB of wheels out) a plot is skipped with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot(path: Path) -> Any:
    """matplotlib.pyplot on the Agg backend, or None (and a note) when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed; skipping the plot {path}", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(results: dict[str, Any], path: Path) -> None:
    """results: label -> object with `train_losses` and `val_losses` [(step, loss)]."""
    if (plt := _pyplot(path)) is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in results.items():
        train = np.asarray(r.train_losses, dtype=float)
        if train.size:
            k = max(1, train.size // 50)
            smooth = np.convolve(train, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(smooth.size) + k, smooth, alpha=0.6, label=f"{label} train")
        if r.val_losses:
            steps, losses = zip(*r.val_losses)
            ax.plot(steps, losses, "o-", label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gate_heatmap(
    tokens: list[str], gates: np.ndarray, layer_ids: list[int], *, path: Path, title: str = ""
) -> None:
    """gates: (num_layers, T) gate value per Engram layer and token, like the paper's gating figure."""
    if (plt := _pyplot(path)) is None:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tokens)), 1.2 + 0.6 * len(layer_ids)))
    im = ax.imshow(gates, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=70, fontsize=8)
    ax.set_yticks(range(len(layer_ids)), [f"layer {layer}" for layer in layer_ids])
    fig.colorbar(im, ax=ax, label="gate alpha")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
