"""Freezing as data: rule matching, coverage, and an optimizer that truly leaves frozen parameters alone."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vggjax
from vggjax.train import freezing, steps
from vggjax.inference.heads import Head, init_classifier
from vggjax.utils.trees import flatten


@pytest.fixture(scope="module")
def tiny():
    """VGG11 base (random pretrained-like weights) + a 16-unit head at 32x32, and one batch."""
    from conftest import random_variables
    base = vggjax.VGG11(include_top=False)
    model, variables = init_classifier(random_variables("vgg11", include_top=False, seed=1, input_rms=70.0),
                                       base, Head(units=16), 32, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
             "label": np.array([0, 1], np.int32), "mask": np.array([True, True])}
    return model, variables, batch


@pytest.fixture(scope="module")
def compiled_steps(tiny):
    """spec -> (optimizer, compiled train step): each compiled once, shared by the tests below."""
    model, variables, batch = tiny
    out = {}

    def get(spec):
        if spec not in out:
            tx = freezing.make_optimizer(freezing.book_rmsprop(1e-3), variables["params"], spec)
            state = steps.TrainState.create(variables, tx)
            step = steps.make_train_step(model, tx, preprocess_mode="caffe")
            out[spec] = tx, step.lower(state, batch).compile()
        return out[spec]

    return get


def groups_of(label_tree, action):
    return {freezing.group_name(p) for p, a in flatten(label_tree).items() if a == action}


def test_presets_select_blocks_on_classifier_and_bare_vgg(tiny):
    _, variables, _ = tiny
    params = variables["params"]
    assert groups_of(freezing.labels(params, "head"), "train") == {"head"}
    assert groups_of(freezing.labels(params, "block5+head"), "train") == {"block5", "head"}
    assert groups_of(freezing.labels(params, "block4+block5+head"), "train") == {"block4", "block5", "head"}
    assert groups_of(freezing.labels(params, "all"), "freeze") == set()
    # The same presets apply to a bare VGG's params (no "base/" prefix).
    assert groups_of(freezing.labels(params["base"], "block5+head"), "train") == {"block5"}


def test_first_matching_rule_wins(tiny):
    params = tiny[1]["params"]
    rules = [(r"head/logits/.*", "freeze"), (r"head/.*", "train"), (r".*", "freeze")]
    labels = flatten(freezing.labels(params, rules))
    assert labels["head/logits/kernel"] == "freeze"
    assert labels["head/hidden/kernel"] == "train"
    reordered = flatten(freezing.labels(params, rules[1:2] + rules[:1] + rules[2:]))
    assert reordered["head/logits/kernel"] == "train"


def test_uncovered_parameters_are_named():
    params = {"base": {"block1_conv1": {"kernel": np.zeros(3), "bias": np.zeros(1)}},
              "head": {"hidden": {"kernel": np.zeros(2)}}}
    with pytest.raises(ValueError, match=r"base/block1_conv1/kernel, base/block1_conv1/bias"):
        freezing.labels(params, [(r"head/.*", "train")])
    with pytest.raises(ValueError, match="unknown freeze preset 'block5'"):
        freezing.labels(params, "block5")
    with pytest.raises(ValueError, match="'train'\\|'freeze'"):
        freezing.labels(params, [(r".*", "trainable")])
    with pytest.raises(ValueError, match="bad regex"):
        freezing.labels(params, [(r"(", "train")])


def test_trainable_report_counts_per_block(tiny):
    params = tiny[1]["params"]
    line = freezing.trainable_report(params, freezing.labels(params, "block5+head"))
    # VGG11: block5 = 2 convs 512->512; head = 512*16+16 + 16+1.
    assert "block5 4,719,616/4,719,616" in line
    assert "block1 0/1,792" in line
    assert "head 8,225/8,225" in line
    assert line.startswith("trainable params 4,727,841 of 9,228,705")


def optimizer_state_size(opt_state) -> int:
    """Scalars held per parameter (leaves of rank >= 1; step counters are scalars)."""
    return sum(leaf.size for leaf in jax.tree.leaves(opt_state) if leaf.ndim >= 1)


def test_frozen_parameters_stay_bit_identical_and_hold_no_state(tiny, compiled_steps):
    model, variables, batch = tiny
    tx, step = compiled_steps("block5+head")
    state = steps.TrainState.create(variables, tx)
    labels = flatten(freezing.labels(variables["params"], "block5+head"))
    trainable = sum(v.size for p, v in flatten(variables["params"]).items() if labels[p] == "train")
    # RMSprop keeps one accumulator per trainable scalar and none for frozen ones.
    assert optimizer_state_size(state.opt_state) == trainable == 4_727_841
    for _ in range(3):
        state, metrics = step(state, batch)
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
    before, after = flatten(variables["params"]), flatten(state.params)
    for path, action in labels.items():
        if action == "freeze":
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        else:
            assert not np.array_equal(after[path], before[path]), path


def test_frozen_blocks_cost_fewer_flops(compiled_steps):
    flops = {spec: compiled_steps(spec)[1].cost_analysis()["flops"] for spec in ("all", "block5+head")}
    ratio = flops["block5+head"] / flops["all"]
    print(f"train-step FLOPs, blocks 1-4 frozen / all trainable: {ratio:.3f} ({flops})")
    # No backward pass through blocks 1-4: well under the all-trainable cost (about 0.37 here).
    assert ratio < 0.6


def test_adamw_weight_decay_leaves_frozen_parameters_alone(tiny):
    params = tiny[1]["params"]
    tx = freezing.make_optimizer(optax.adamw(1e-2, weight_decay=0.5), params, "head")
    opt_state = tx.init(params)
    # Adam's two moments for the head's 8,225 scalars only.
    assert optimizer_state_size(opt_state) == 2 * 8_225

    @jax.jit
    def step_with_zero_gradients(params, opt_state):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
        return optax.apply_updates(params, updates)

    new = flatten(step_with_zero_gradients(params, opt_state))
    for path, value in flatten(params).items():
        if path.startswith("head/") and path.endswith("kernel"):
            assert not np.array_equal(new[path], value), path  # decayed (the biases start at 0)
        else:
            np.testing.assert_array_equal(new[path], value, err_msg=path)


def test_book_rmsprop_matches_keras_rmsprop(keras):
    w0 = np.array([0.5, -1.0, 2.0], np.float32)
    grads = [np.array(g, np.float32) for g in ([0.1, -0.2, 0.3], [1.0, 0.5, -0.25], [-0.3, 0.0, 0.2])]
    var = keras.Variable(w0)
    opt = keras.optimizers.RMSprop(learning_rate=1e-2)
    for g in grads:
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
    tx = freezing.book_rmsprop(1e-2)
    w, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, w)
        w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(np.asarray(w), var.numpy(), rtol=1e-6, atol=1e-7)
