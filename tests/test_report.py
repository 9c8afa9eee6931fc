"""Run outputs: JSON files that accumulate phases and the training-curves PNG."""
import json

import numpy as np
import pytest
from PIL import Image

from vggjax.train import report
from vggjax.utils import atomic


def _history(n, start=0.5):
    return [{"epoch": e, "loss": 1.0 / e, "accuracy": start + 0.04 * e, "val_loss": 1.2 / e,
             "val_accuracy": start + 0.03 * e} for e in range(1, n + 1)]


def test_update_json_accumulates_phases_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / report.HISTORY
    report.update_json(path, "features", _history(2))
    content = report.update_json(path, "frozen", _history(3))
    assert json.loads(path.read_text()) == content == {"features": _history(2), "frozen": _history(3)}
    report.update_json(path, "features", _history(1))  # a rerun replaces only its own phase
    assert json.loads(path.read_text())["features"] == _history(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [atomic.MANIFEST, report.HISTORY]


def test_curves_png_has_one_column_per_phase(tmp_path):
    one = report.plot_curves({"features": _history(5)}, tmp_path / "one.png")
    three = report.plot_curves({"features": _history(5), "frozen": _history(4), "finetune": _history(6)},
                               tmp_path / "three.png")
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(one) as a, Image.open(three) as b:
        a.load(), b.load()
        assert a.format == b.format == "PNG"
        assert a.height == b.height and b.width > 2.5 * a.width
        # Not a blank canvas: blue curves in every column.
        rgb = np.asarray(b.convert("RGB")).astype(int)
        blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 80) & (rgb[..., 1] < 80)
        thirds = np.array_split(blue, 3, axis=1)
        assert all(t.sum() > 100 for t in thirds)
    with pytest.raises(ValueError, match="no history"):
        report.plot_curves({"features": []}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
