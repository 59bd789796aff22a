"""PNG plots of a training run from its `metrics.jsonl`: loss, expert load per layer, neuron sparsity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from smallthinker.train.metrics import read_metrics


def subplots(
    *args: int, figsize: tuple[float, float], layout: str | None = None, **kwargs: Any
) -> tuple[Figure, Any]:
    """`pyplot.subplots` without pyplot: a figure that only ever renders to files, so no GUI backend is chosen
    and the process-wide backend setting is left alone."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*args, **kwargs)


def plot_loss(records: list[dict[str, Any]], out: Path) -> Path:
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax_loss.plot(steps, [r["loss"] for r in records], label="LM loss")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_aux = ax_loss.twinx()
    ax_aux.plot(steps, [r["aux_loss"] for r in records], color="tab:orange", alpha=0.6, label="balance loss")
    ax_aux.set_ylabel("balance loss (1 = balanced)")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_aux.get_legend_handles_labels()[0]
    ax_loss.legend(handles=handles, loc="upper right")
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:green")
    ax_lr.set_ylabel("LR")
    ax_lr.set_xlabel("optimizer step")
    fig.suptitle("Training loss")
    return _save(fig, out / "loss.png")


def plot_expert_load(records: list[dict[str, Any]], out: Path, max_layers: int = 16) -> Path | None:
    """One heatmap per layer: each expert's share of the routed tokens (x: step, y: expert).

    Bright rows are hot experts, dark rows cold ones; the colour scale is relative to a uniform
    share (1.0 = 1/E), so layers with different expert counts read alike.
    """
    rows = [r for r in records if "expert_share" in r]
    if not rows:
        return None
    share_SLE = np.array([r["expert_share"] for r in rows])
    num_layers, num_experts = share_SLE.shape[1], share_SLE.shape[2]
    layers = np.unique(np.linspace(0, num_layers - 1, min(num_layers, max_layers)).round().astype(int))
    cols = min(4, len(layers))
    nrows = -(-len(layers) // cols)
    fig, axes = subplots(
        nrows, cols, figsize=(3.2 * cols, 2.6 * nrows + 0.6), squeeze=False, sharex=True, layout="constrained"
    )
    steps = [r["step"] for r in rows]
    vmax = max(2.0, float((share_SLE * num_experts).max()))
    for ax, layer in zip(axes.flat, layers):
        load_ES = share_SLE[:, layer, :].T * num_experts  # [steps, experts] -> [experts, steps]
        image = ax.imshow(load_ES, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=vmax,
                          extent=[steps[0], steps[-1], num_experts - 0.5, -0.5])  # fmt: skip
        ax.set_title(f"layer {layer}", fontsize="small")
        ax.set_ylabel("expert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="load / uniform")
    fig.suptitle("Expert load per layer (share of routed tokens)")
    fig.savefig(out / "expert_load.png", dpi=110)
    return out / "expert_load.png"


def plot_load_balance(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Per-layer max/min load and normalised entropy over steps."""
    rows = [r for r in records if "load_max" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    panels = [
        ("load_max", "max load / uniform"),
        ("load_min", "min load / uniform"),
        ("load_entropy", "entropy / log E"),
    ]
    fig, axes = subplots(1, len(panels), figsize=(13, 3.8))
    num_layers = len(rows[0]["load_max"])
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 1, num_layers))
    for ax, (key, title) in zip(axes, panels):
        for layer in range(num_layers):
            ax.plot(steps, [r[key][layer] for r in rows], color=colors[layer], label=f"layer {layer}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if num_layers <= 8:
        axes[0].legend(fontsize="small")
    return _save(fig, out / "load_balance.png")


def plot_neuron_sparsity(records: list[dict[str, Any]], out: Path) -> Path | None:
    rows = [r for r in records if "zero_neuron_fraction" in r]
    if not rows:
        return None
    fig, ax = subplots(figsize=(8, 4.5))
    num_layers = len(rows[0]["zero_neuron_fraction"])
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 1, num_layers))
    for layer in range(num_layers):
        ax.plot([r["step"] for r in rows], [r["zero_neuron_fraction"][layer] for r in rows],
                color=colors[layer], label=f"layer {layer}")  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of relu(gate) == 0")
    ax.set_title("ReGLU neuron sparsity in routed experts")
    ax.grid(alpha=0.3)
    if num_layers <= 16:
        ax.legend(fontsize="small", ncol=2)
    return _save(fig, out / "neuron_sparsity.png")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Render every plot the run's metrics allow; returns the PNG paths (default `RUN_DIR/plots/`)."""
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty: the run has not logged a step yet")
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    made = [
        plot_loss(records, out),
        plot_expert_load(records, out),
        plot_load_balance(records, out),
        plot_neuron_sparsity(records, out),
    ]
    return [p for p in made if p is not None]
