"""Multi-host data parallel: 2 processes joined by jax.distributed, one input pipeline each, equal 1 process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

STEPS_BATCH = 4  # global batch; 10 images -> 3 steps, the last one short (padding on both shards)


def train_one_epoch(folder: str, out: str) -> None:
    """Worker body: this process's shard of the folder's train split, one epoch of a VGG11
    classifier on the global mesh; process 0 writes the final parameters."""
    from vggjax.train import parallel

    parallel.initialize_distributed()  # reads JAX_COORDINATOR_ADDRESS etc.; no-op for one process
    import jax
    import optax

    import vggjax
    from conftest import random_variables
    from vggjax.train import data, freezing, steps
    from vggjax.inference.heads import Head, init_classifier

    split = data.load_split(folder, "train", 32, STEPS_BATCH, shuffle=True, seed=3)
    split = split.shard(jax.process_index(), jax.process_count())
    model, variables = init_classifier(random_variables("vgg11", include_top=False, seed=5, input_rms=70.0),
                                       vggjax.VGG11(include_top=False), Head(units=16), 32,
                                       jax.random.PRNGKey(0))
    tx = freezing.make_optimizer(optax.sgd(0.05), variables["params"], "block5+head")
    mesh = parallel.make_mesh()
    step = steps.make_train_step(model, tx, preprocess_mode="caffe", mesh=mesh)
    state = parallel.replicate(steps.TrainState.create(variables, tx, seed=1), mesh)
    counts = []
    for batch in split.batches(0):
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        counts.append(int(metrics["count"]))
    if jax.process_index() == 0:
        flat = vggjax.utils.trees.flatten(jax.device_get(state.params))
        np.savez(out, **{k.replace("/", "."): v for k, v in flat.items()})
        with open(out + ".json", "w") as f:
            json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                       "local_batch": int(split.local_batch_size), "counts": counts}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(folder, out, processes, subprocess_env):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(subprocess_env, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], here])
    env.pop("XLA_FLAGS", None)
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    procs = [subprocess.Popen([sys.executable, __file__, str(folder), str(out)],
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    info = json.loads(open(str(out) + ".json").read())
    return dict(np.load(str(out) + ".npz")), info


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, subprocess_env):
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        d = tmp_path / "data" / "train" / label
        d.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    one, one_info = _launch(tmp_path / "data", tmp_path / "one", 1, subprocess_env)
    two, two_info = _launch(tmp_path / "data", tmp_path / "two", 2, subprocess_env)
    assert (one_info["processes"], two_info["processes"]) == (1, 2)
    assert two_info["devices"] == 2 and two_info["local_batch"] == STEPS_BATCH // 2
    assert one_info["counts"] == two_info["counts"] == [4, 4, 2]  # every image once, in 3 steps
    worst = 0.0
    for name, ref in one.items():
        scale = max(float(np.abs(ref).max()), 1e-12)
        worst = max(worst, float(np.abs(two[name] - ref).max()) / scale)
    print(f"max relative parameter difference, 2 processes vs 1: {worst:.2e}")
    assert worst < 1e-5


if __name__ == "__main__":
    train_one_epoch(sys.argv[1], sys.argv[2])
