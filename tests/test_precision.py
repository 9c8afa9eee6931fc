"""Config.precision: validated, and a tiny bf16 run of every phase (bf16 compute with
fp32 parameters: the features cached in float32 from a bf16 conv base, fp32 checkpoints)."""
import json

import jax
import numpy as np
import pytest

from vggjax.train import synthetic, workflow
from vggjax.train.config import Config, PHASES


def test_precision_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"precision \(--precision\) must be one of \['bf16', 'fp32'\], found 'fp16'"):
        Config(weights=str(tmp_path), workdir=str(tmp_path), precision="fp16")
    assert Config(weights="w", workdir="d").compute_dtype is None
    assert Config(weights="w", workdir="d", precision="bf16").compute_dtype == jax.numpy.bfloat16


def test_bf16_run_of_all_three_phases(tmp_path):
    # synthetic.inputs' conv base with a quarter of its images: the 2 training steps of 20, one batch
    # each to validate and test (every phase still extracts, trains, evaluates and exports).
    data = str(synthetic.make_image_folder(tmp_path / "inputs" / "data",
                                       sizes={"train": 20, "validation": 10, "test": 10}))
    weights = str(synthetic.make_random_weights(tmp_path / "inputs" / "random_vgg16_notop"))
    config = Config(
        weights=weights, workdir=str(tmp_path / "run"), data=data, phases=("features", "finetune"),
        image_size=48, batch_size=20, epochs=dict.fromkeys(PHASES, 1),
        learning_rates=synthetic.SETTINGS["learning_rates"], steps_per_epoch=2, checkpoint_every=None,
        progress=False, precision="bf16")
    results = workflow.run(config)
    assert set(results) == set(PHASES)
    for phase, r in results.items():
        assert np.isfinite(r["test_loss"]) and 0 <= r["test_accuracy"] <= 1, phase
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    # Feature extraction ran the conv base in bf16 (its cache key records the module's dtype)
    # and stored float32 features.
    infos = [json.loads(p.read_text()) for p in (run / "features_cache").glob("*/info.json")]
    assert infos and all("bfloat16" in i["inputs"]["model"]["dtype"] for i in infos)
    feats = [np.load(p, mmap_mode="r") for p in (run / "features_cache").glob("train-*/features.npy")]
    assert feats[0].dtype == np.float32 and np.isfinite(feats[0]).all()
    # The exported classifier keeps fp32 parameters.
    head = (run / "classifiers" / "finetune" / "head.safetensors")
    assert head.is_file()
    from safetensors.numpy import load_file
    assert {a.dtype for a in load_file(head).values()} == {np.dtype(np.float32)}
