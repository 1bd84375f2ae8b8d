"""PNG plots of a run (matplotlib, no display needed): per-domain Recall@10 of every candidate model, the
learned merging coefficients (domain x layer group), and the coefficient-learning loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def recall_plot(metrics: dict, out: Path, metric: str = "recall@10") -> Path:
    """Grouped bars: one group per domain, one bar per candidate model."""
    domains = sorted(metrics)
    models = list(dict.fromkeys(m for d in domains for m in metrics[d]))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(domains) * max(1, len(models)) * 0.45), 4.2))
    cmap = plt.get_cmap("tab20")
    x = np.arange(len(domains))
    for i, model in enumerate(models):
        vals = [metrics[d].get(model, {}).get("values", {}).get(metric, np.nan) for d in domains]
        hatch = "//" if model.startswith("mergerec") else None
        ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=model, color=cmap(i % 20), hatch=hatch,
               edgecolor="black", linewidth=0.4)
    ax.set_xticks(x, domains)
    ax.set_ylabel(f"test {metric.replace('recall', 'Recall').replace('ndcg', 'NDCG')}")
    ax.set_title(f"Test {metric} per domain, every candidate model (full ranking)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def coefficient_plot(learned: dict, out: Path) -> Path:
    """One heatmap per granularity: rows = domains, columns = layer groups, value = learned W."""
    grans = list(learned)
    fig, axes = plt.subplots(1, len(grans), figsize=(4.2 * len(grans) + 1, 3.2), squeeze=False)
    for ax, gran in zip(axes[0], grans):
        c = learned[gran]
        W = np.array(c["W"], dtype=float)
        im = ax.imshow(W, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(c["groups"])), c["groups"], rotation=30, ha="right")
        ax.set_yticks(range(len(c["domains"])), c["domains"])
        for (r, col), v in np.ndenumerate(W):
            ax.text(col, r, f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if v < W.mean() else "black")
        ax.set_title(f"{gran}-wise coefficients W")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def loss_plot(learned: dict, out: Path) -> Path | None:
    """Training loss per step (and held-out loss where recorded) of each granularity's coefficient learning."""
    if not any(c.get("history") for c in learned.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (gran, c) in enumerate(learned.items()):
        hist = c.get("history") or []
        if hist:
            steps = np.array([h["step"] for h in hist])
            loss = np.array([h["loss"] for h in hist])
            win = max(1, len(loss) // 25)
            smooth = np.convolve(loss, np.ones(win) / win, mode="valid")
            style = ["-", "--", ":"][i % 3]  # variants often learn alike: dashes keep both lines visible
            ax.plot(steps, loss, color=f"C{i}", alpha=0.2, linewidth=0.8)
            ax.plot(steps[win - 1:], smooth, style, color=f"C{i}", label=f"{gran}-wise, training (moving mean {win})")
        hold = c.get("holdout") or []
        if hold:
            ax.plot([h["step"] for h in hold], [h["loss"] for h in hold], "o--", color=f"C{i}", markersize=3,
                    label=f"{gran}-wise, held-out pseudo-users")
    ax.set_xlabel("step")
    ax.set_ylabel("MergeRec loss (CE + KL to silo teachers)")
    ax.set_title("Coefficient learning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_plots(folder: Path, metrics: dict, learned: dict) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = [recall_plot(metrics, folder / "recall_at_10.png"), coefficient_plot(learned, folder / "coefficients.png"),
            loss_plot(learned, folder / "coefficient_loss.png")]
    return [p for p in made if p is not None]
