"""Run outputs: JSON files that accumulate phases and the training-curves PNG."""
import json

import numpy as np
import pytest
from PIL import Image

from vggjax.train import report, synthetic
from vggjax.utils import ownership


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, report.HISTORY]


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


def test_smooth_curve_is_the_book_s_exponential_moving_average():
    points = [1.0, 0.0, 0.0, 1.0]
    assert report.smooth_curve(points) == pytest.approx([1.0, 0.8, 0.64, 0.712])  # prev * 0.8 + point * 0.2
    assert report.smooth_curve(points, factor=0.0) == points and report.smooth_curve([]) == []
    with pytest.raises(ValueError, match=r"factor must be in \[0, 1\), found 1"):
        report.smooth_curve(points, factor=1)


def test_the_figure_says_in_red_when_the_weights_are_random_or_the_data_synthetic(tmp_path):
    def red_rows(path):
        with Image.open(path) as png:
            rgb = np.asarray(png.convert("RGB")).astype(int)
        red = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
        return np.flatnonzero(red.any(axis=1))

    histories = {"features": _history(2)}
    assert len(red_rows(report.plot_curves(histories, tmp_path / "real.png"))) == 0
    # What the smoke run's inputs are called: generated images, weights converted from random_*.h5.
    data = synthetic.make_image_folder(tmp_path / "data", sizes={"train": 1})
    meta = {"arch": "vgg16", "source_file": str(tmp_path / synthetic.RANDOM_H5.format(arch="vgg16", seed=3))}
    notes = synthetic.notes(str(data), meta)
    assert notes == ["random weights", "synthetic data"]
    assert synthetic.notes(str(tmp_path), dict(meta, source_file="vgg16_weights_tf_dim_ordering.h5")) == []
    rows = red_rows(report.plot_curves(histories, tmp_path / "smoke.png", notes=notes))
    with Image.open(tmp_path / "smoke.png") as png:
        assert len(rows) > 5 and rows.max() < 0.05 * png.height  # a title line above the panels
