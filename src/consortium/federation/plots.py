"""PNG plots of federated runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_auprc_per_round(
    rounds: Sequence[int],
    auprc: Sequence[float],
    *,
    path: str | Path,
    centralized: float | None = None,
    local_only_mean: float | None = None,
    title: str = "Global model AUPRC on the held-out split",
) -> Path:
    """Line plot of the federated model's AUPRC per round with baseline reference lines."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(list(rounds), list(auprc), marker="o", label="federated (global model)")
    if centralized is not None:
        ax.axhline(centralized, color="tab:green", linestyle="--", label=f"centralized ({centralized:.3f})")
    if local_only_mean is not None:
        ax.axhline(local_only_mean, color="tab:red", linestyle=":", label=f"local-only mean ({local_only_mean:.3f})")
    ax.set_xlabel("round")
    ax.set_ylabel("AUPRC")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
