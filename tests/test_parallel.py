"""Data parallelism: a train step on 4 (fake CPU) devices equals the 1-device step; batch checks; launch env."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vggjax.train import parallel


def run_on_four_devices() -> dict:
    """Child process body (XLA_FLAGS gives 4 CPU devices): one train and one eval step on 1 device
    and on the 4-device mesh, from the same state and batch; returns what the parent checks."""
    import jax
    import optax

    import vggjax
    from conftest import random_variables
    from vggjax.train import augmentation, freezing, steps
    from vggjax.inference.heads import Head, init_classifier

    assert jax.device_count() == 4, jax.devices()
    base = vggjax.VGG11(include_top=False)
    model, variables = init_classifier(random_variables("vgg11", include_top=False, seed=5, input_rms=70.0),
                                       base, Head(units=16), 32, jax.random.PRNGKey(0))
    # Plain SGD: the parameter change is the gradient itself, so the comparison is a gradient one.
    tx = freezing.make_optimizer(optax.sgd(0.1), variables["params"], "block5+head")
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 2, 8).astype(np.int32), "mask": np.arange(8) < 7}
    kwargs = dict(augment=augmentation.SECOND_EDITION, preprocess_mode="caffe")

    one_step = steps.make_train_step(model, tx, **kwargs)
    one_eval = steps.make_eval_step(model, preprocess_mode="caffe")
    one_state, one_metrics = one_step(steps.TrainState.create(variables, tx, seed=7), batch)
    one_eval_metrics = one_eval(one_state, batch)

    mesh = parallel.make_mesh()
    four_step = steps.make_train_step(model, tx, mesh=mesh, **kwargs)
    four_eval = steps.make_eval_step(model, preprocess_mode="caffe", mesh=mesh)
    sharded = parallel.shard_batch(batch, mesh)
    four_state, four_metrics = four_step(
        parallel.replicate(steps.TrainState.create(variables, tx, seed=7), mesh), sharded)
    four_eval_metrics = four_eval(four_state, sharded)

    errors = {}
    before = vggjax.utils.trees.flatten(variables["params"])
    one, four = vggjax.utils.trees.flatten(one_state.params), vggjax.utils.trees.flatten(four_state.params)
    for path in one:
        d1, d4 = np.asarray(one[path]) - before[path], np.asarray(four[path]) - before[path]
        if np.abs(d1).max() > 0:
            errors[path] = float(np.abs(d1 - d4).max() / np.abs(d1).max())
    try:
        parallel.shard_batch({k: v[:6] for k, v in batch.items()}, mesh)
        indivisible = "no error"
    except ValueError as e:
        indivisible = str(e)
    return {
        "relative_update_error": errors,
        "metrics": {k: [float(one_metrics[k]), float(four_metrics[k])] for k in one_metrics},
        "eval": {k: [float(one_eval_metrics[k]), float(four_eval_metrics[k])] for k in one_eval_metrics},
        "batch_devices": len(sharded["image"].sharding.device_set),
        "shard_shape": list(sharded["image"].addressable_shards[0].data.shape),
        "state_replicated": bool(four_state.params["head"]["hidden"]["kernel"].sharding.is_fully_replicated),
        "state_devices": len(four_state.params["head"]["hidden"]["kernel"].sharding.device_set),
        "indivisible": indivisible,
    }


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(here), here, env.get("PYTHONPATH")) if p)
    out = tmp_path_factory.mktemp("parallel") / "result.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_four_device_step_equals_one_device_step(four_devices):
    errors = four_devices["relative_update_error"]
    # block5 and the head train; their updates agree to fp32 reduction-order noise.
    assert {p.split("/")[1].split("_")[0] for p in errors} == {"block5", "hidden", "logits"}
    worst = max(errors.values())
    print(f"max relative update difference, 4 devices vs 1: {worst:.2e}")
    assert worst < 1e-5, errors
    for name, (one, four) in {**four_devices["metrics"], **four_devices["eval"]}.items():
        assert four == pytest.approx(one, rel=1e-5), name
    assert four_devices["metrics"]["count"] == [7, 7]  # the padded example counts zero


def test_batch_is_split_and_state_replicated(four_devices):
    assert four_devices["batch_devices"] == 4
    assert four_devices["shard_shape"] == [2, 32, 32, 3]
    assert four_devices["state_replicated"] and four_devices["state_devices"] == 4


def test_indivisible_global_batch_is_a_clear_error(four_devices):
    message = four_devices["indivisible"]
    assert "global batch 6" in message and "4 devices" in message and "multiple of 4" in message


def test_single_device_mesh_and_launch_environment(monkeypatch):
    import jax
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    sharded = parallel.shard_batch({"label": np.arange(4, dtype=np.int32)}, mesh)
    np.testing.assert_array_equal(sharded["label"], np.arange(4))
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False  # single process: nothing to initialise
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        parallel.initialize_distributed()


if __name__ == "__main__":
    result = run_on_four_devices()
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
