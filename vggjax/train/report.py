"""What a training run leaves for people: history.json, results.json and curves.png."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def plot_curves(histories: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> Path:
    """Write the book's training plots to `path` (PNG): one column per phase, accuracy on top and
    loss below, training as dots and validation as a line, against the epoch.

    histories: {phase: [{"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}, ...]}.
    """
    require("matplotlib", "plotting training curves")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global pyplot state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    phases = [p for p, h in histories.items() if h]
    if not phases:
        raise ValueError("no history to plot: every phase is empty")
    fig = Figure(figsize=(4.5 * len(phases), 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(phases), squeeze=False)
    for col, phase in enumerate(phases):
        epochs = [r["epoch"] for r in histories[phase]]
        for row, metric in enumerate(("accuracy", "loss")):
            ax = axes[row, col]
            ax.plot(epochs, [r[metric] for r in histories[phase]], "bo", markersize=3,
                    label=f"Training {metric}")
            # The book's solid line, plus small crosses so a one-epoch run still shows its point.
            ax.plot(epochs, [r[f"val_{metric}"] for r in histories[phase]], "b-x", markersize=4,
                    label=f"Validation {metric}")
            ax.set_title(f"{phase}: training and validation {metric}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
    with atomic.writing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return Path(path)
