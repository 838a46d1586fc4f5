"""Figure helpers shared by the search report (:mod:`matfusion.tracking.report`) and the
benchmark report (:mod:`matfusion.benchmark.report`).

Figures are drawn on matplotlib's Agg canvas directly: no pyplot state, no display needed, safe
in a Ray driver and in tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np


def new_figure(width: float, height: float):
    """A ``Figure`` of ``width`` x ``height`` inches at 100 dpi on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)


def family_colors(families: Iterable) -> dict:
    """One tab10 colour per distinct family, assigned in sorted order."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {f: cmap(i % 10) for i, f in enumerate(sorted(set(families)))}


def maybe_log_y(ax, values) -> None:
    """A log y axis when the finite values are all positive and span more than a factor 20."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) and v.min() > 0 and v.max() / v.min() > 20:
        ax.set_yscale("log")


def plot_running_best(ax, values, label: str = "best so far", **style) -> None:
    """The running minimum of ``values`` (trial scores in start order; NaN for a trial without one)
    as a step line over trial numbers 1..n, from the first finite value on."""
    vals = np.asarray(values, dtype=float)
    order = np.arange(1, len(vals) + 1)
    running = np.fmin.accumulate(np.where(np.isfinite(vals), vals, np.inf))
    shown = np.isfinite(running)
    ax.step(order[shown], running[shown], where="post", lw=1.5, label=label, **style)
