"""Pictures of connections over time: one band per Deployment, stacked, against `usable`.

Used by the demo (live connections of real pods while they scale and roll) and by the
fleet proof (budgeted vs naive bursts). matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from devtools.apps import ConnectionTimeline


def plot_connections(
    panels: Sequence[tuple[str, ConnectionTimeline]],
    *,
    usable: int,
    max_connections: int,
    path: Path,
) -> Path:
    """One panel per (title, timeline), side by side, sharing the y axis."""
    figure, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 4.2), sharey=True, squeeze=False
    )
    top = max([max_connections, *(t.peak_total() for _, t in panels)])
    for axis, (title, timeline) in zip(axes[0], panels, strict=True):
        times = [t for t, _ in timeline.samples]
        series = [
            [counts.get(a, 0) for _, counts in timeline.samples] for a in timeline.applications
        ]
        if times:
            axis.stackplot(times, series, labels=timeline.applications, alpha=0.8, step="post")
        axis.axhline(usable, color="black", linestyle="--", linewidth=1.2,
                     label=f"usable ({usable})")  # fmt: skip
        axis.axhline(max_connections, color="firebrick", linestyle=":", linewidth=1.2,
                     label=f"max_connections ({max_connections})")  # fmt: skip
        for when, label in timeline.marks:
            axis.axvline(when, color="grey", linewidth=0.6)
            axis.annotate(label, (when, top * 1.3), fontsize=7, rotation=90, va="top",
                          ha="right", color="dimgrey")  # fmt: skip
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("seconds")
        axis.set_ylim(0, top * 1.35)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("client connections (pg_stat_activity)")
    axes[0][-1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=5, fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
