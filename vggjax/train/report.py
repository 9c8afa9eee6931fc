"""What a training run leaves for people: history.json, results.json and curves.png."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vggjax.utils import atomic
from vggjax.utils.extras import require

HISTORY, RESULTS, CURVES = "history.json", "results.json", "curves.png"


def update_json(path: str | os.PathLike, key: str, value: Any) -> dict:
    """Set `key` in the JSON object at `path` (created if absent), written atomically; return it all.

    Phases run in separate invocations accumulate in one file this way.
    """
    path = Path(path)
    content = json.loads(path.read_text()) if path.is_file() else {}
    content[key] = value
    with atomic.writing(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")
    return content


def smooth_curve(points: Iterable[float], factor: float = 0.8) -> list[float]:
    """The book's smoothing (DLwP 1st ed., 5.3, its last figure): an exponential moving average,
    each point `previous * factor + point * (1 - factor)`, the first kept as is. floats -> floats."""
    if not 0 <= factor < 1:
        raise ValueError(f"factor must be in [0, 1), found {factor!r}")
    smoothed: list[float] = []
    for point in points:
        smoothed.append(smoothed[-1] * factor + point * (1 - factor) if smoothed else float(point))
    return smoothed


# The figure's rows: (title, history key without "val_", smoothed?).
_ROWS = (("accuracy", "accuracy", False), ("loss", "loss", False),
         ("smoothed accuracy", "accuracy", True), ("smoothed loss", "loss", True))


def plot_curves(histories: Mapping[str, Sequence[Mapping]], path: str | os.PathLike,
                notes: Sequence[str] = ()) -> Path:
    """Write the book's training plots to `path` (PNG): one column per phase; rows accuracy,
    loss, and both smoothed (`smooth_curve`, the book's last figure); training as dots and
    validation as a line against the epoch (integer ticks), one y-range per row so phases
    compare at a glance. `notes` (e.g. `synthetic.notes`: "random weights") head the figure.

    histories: {phase: [{"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}, ...]}.
    """
    require("matplotlib", "plotting training curves")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global pyplot state
    from matplotlib.figure import Figure

    phases = [p for p, h in histories.items() if h]
    if not phases:
        raise ValueError("no history to plot: every phase is empty")
    fig = Figure(figsize=(4.5 * len(phases), 3.2 * len(_ROWS) + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(_ROWS), len(phases), squeeze=False, sharey="row")
    for col, phase in enumerate(phases):
        epochs = [r["epoch"] for r in histories[phase]]
        for row, (title, metric, smooth) in enumerate(_ROWS):
            shape = smooth_curve if smooth else list
            ax = axes[row, col]
            ax.plot(epochs, shape([r[metric] for r in histories[phase]]), "bo", markersize=3,
                    label=f"Training {metric}")
            # The book's solid line, plus small crosses so a one-epoch run still shows its point.
            ax.plot(epochs, shape([r[f"val_{metric}"] for r in histories[phase]]), "b-x", markersize=4,
                    label=f"Validation {metric}")
            ax.set_title(f"{phase}: {title}")
            ax.set(xlabel="epoch", ylabel=title)
            _integer_epochs(ax, epochs)
            ax.legend()
    if notes:
        fig.suptitle("NOT a real run: " + ", ".join(notes), color="red", fontweight="bold")
    with atomic.writing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return Path(path)


def _integer_epochs(ax, epochs: Sequence[int]) -> None:
    """Epoch ticks at whole numbers only, every epoch of a short run."""
    from matplotlib.ticker import MaxNLocator

    if len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
