"""The train state and the jitted train / eval steps (Flax's `train_step` / `eval_step`), with the
masked metrics they return and their running sums on the device."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from vggjax.inference.heads import class_logits
from vggjax.model.compute_dtype import with_compute_dtype
from vggjax.train import augmentation
from vggjax.train.parallel import batch_sharding, replicated
from vggjax.weights.preprocessing import preprocess_input


@flax.struct.dataclass
class TrainState:
    """Everything a training phase carries from step to step; a pytree, checkpointed as is.

    step: int32 scalar, optimizer steps taken in this phase. params / batch_stats: the model's
    variables (batch_stats {} without BatchNorm). opt_state: the phase's optimizer state.
    rng: uint32[2] key; step k draws its dropout and augmentation randomness from
    fold_in(rng, k), so a run resumed at step k draws exactly what an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, variables: Mapping, tx: optax.GradientTransformation, seed: int = 0) -> "TrainState":
        """Fresh state at step 0 for `variables` ({"params", ["batch_stats"]}) and optimizer `tx`.

        The arrays are copied, so donating the state to a train step never deletes the caller's.
        """
        params = jax.tree.map(jnp.array, variables["params"])
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   batch_stats=jax.tree.map(jnp.array, dict(variables.get("batch_stats", {}))),
                   opt_state=tx.init(params), rng=jax.random.PRNGKey(seed))

    def variables(self) -> dict:
        """{"params": ..., ["batch_stats": ...]} for model.apply."""
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def batch_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Masked loss and accuracy of one batch: padded examples (mask False) count zero.

    logits (B, K): softmax cross-entropy against integer labels; a binary head's (B, 1) goes
    through `heads.class_logits`, the rule predicting uses, which makes this its sigmoid
    cross-entropy against labels in {0, 1} and "correct" mean logit > 0. Returns float32 "loss"
    and "accuracy" means over the real examples (0 when there are none) and int32 "count" of them.
    """
    logits = class_logits(logits)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    count = jnp.sum(mask, dtype=jnp.int32)
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    return {"loss": jnp.sum(jnp.where(mask, losses, 0.0)) / denominator,
            "accuracy": jnp.sum(jnp.where(mask, correct, False), dtype=jnp.float32) / denominator,
            "count": count}


def model_inputs(images, key, augment, preprocess_mode, dtype):
    """What a step feeds the model: `images` augmented (when `augment` is a config, drawn from
    `key`), preprocessed (when `preprocess_mode`), as `dtype` (None: float32)."""
    if augment is not None:
        images = augmentation.augment(key, images, augment)
    if preprocess_mode is not None:
        images = preprocess_input(images, preprocess_mode)
    return jnp.asarray(images).astype(dtype or jnp.float32)



def _apply(model, state, x, *, train, rngs=None):
    """(logits, new batch_stats): BatchNorm models return updated running statistics."""
    if not state.batch_stats:
        return model.apply({"params": state.params}, x, train=train, rngs=rngs), state.batch_stats
    logits, updates = model.apply(state.variables(), x, train=train, rngs=rngs, mutable=["batch_stats"])
    return logits, updates["batch_stats"]


def _jit(step, mesh, donate: bool):
    """jax.jit with the state replicated and the batch split over `mesh` (when given)."""
    kwargs = {"donate_argnums": 0} if donate else {}
    if mesh is not None:
        kwargs.update(in_shardings=(replicated(mesh), batch_sharding(mesh)),
                      out_shardings=(replicated(mesh), replicated(mesh)) if donate else replicated(mesh))
    return jax.jit(step, **kwargs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, input_key: str = "image",
                    augment=None, preprocess_mode: str | None = None, mesh=None,
                    compute_dtype=None) -> Callable:
    """One jitted `train_step(state, batch) -> (state, metrics)`; the state's buffers are donated.

    batch: {input_key: (B, ...) inputs, "label": int32 (B,), "mask": bool (B,)}. Inside one
    jit: batch[input_key] -> `augmentation.augment` (when `augment` is a config; uint8 or 0..255
    images) -> `preprocess_input(mode)` (when `preprocess_mode`) -> model.apply(train=True,
    dropout) -> masked loss (`batch_metrics`) -> gradients -> tx.update -> new params. Keeping
    all of it in one program lets XLA drop the backward pass through frozen blocks.
    metrics: {"loss", "accuracy"} float32 means over the real examples, "count" int32.
    With input_key="features" and a `Head` as model, it trains a head on cached conv features.
    compute_dtype=jnp.bfloat16 runs the model in bf16 with fp32 parameters and fp32 loss
    (`with_compute_dtype`); None keeps the model's own dtype.
    With `mesh`, the state must be replicated (`parallel.replicate`) and the batch sharded
    (`parallel.shard_batch`); XLA averages gradients across devices.
    """
    model = with_compute_dtype(model, compute_dtype)

    def train_step(state: TrainState, batch):
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        x = model_inputs(batch[input_key], augment_key, augment, preprocess_mode, compute_dtype)

        def loss_fn(params):
            logits, batch_stats = _apply(model, state.replace(params=params), x, train=True,
                                         rngs={"dropout": dropout_key})
            metrics = batch_metrics(logits, batch["label"], batch["mask"])
            return metrics["loss"], (metrics, batch_stats)

        grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                             opt_state=opt_state), metrics

    return _jit(train_step, mesh, donate=True)


def make_eval_step(model: nn.Module, *, input_key: str = "image", preprocess_mode: str | None = None,
                   mesh=None, compute_dtype=None) -> Callable:
    """Jitted `eval_step(state, batch) -> metrics` (inference mode, no augmentation).

    Same batch contract and metrics as the train step: masked means plus the count of real
    examples, so padded examples count zero and `evaluate` can weight batches exactly.
    """
    model = with_compute_dtype(model, compute_dtype)

    def eval_step(state: TrainState, batch):
        x = model_inputs(batch[input_key], None, None, preprocess_mode, compute_dtype)
        logits, _ = _apply(model, state, x, train=False)
        return batch_metrics(logits, batch["label"], batch["mask"])

    return _jit(eval_step, mesh, donate=False)


@jax.jit
def accumulate(totals, metrics):
    """`totals` (`metric_totals`) plus one step's `metrics` ("loss", "accuracy" means and
    "count"), on the device: no host sync per step."""
    count = metrics["count"]
    return {"loss_sum": totals["loss_sum"] + metrics["loss"] * count,
            # accuracy * count is an integer up to float rounding
            "correct": totals["correct"] + jnp.round(metrics["accuracy"] * count).astype(jnp.int32),
            "count": totals["count"] + count}


def metric_totals(loss_sum: float = 0.0, correct: int = 0, count: int = 0) -> dict:
    """Running sums of an epoch's metrics: float32 "loss_sum", int32 "correct" and "count"."""
    return {"loss_sum": jnp.float32(loss_sum), "correct": jnp.int32(correct), "count": jnp.int32(count)}


def epoch_means(totals) -> dict:
    """{"loss", "accuracy"} means (Python floats) and "count" of `totals` (`metric_totals`)."""
    t = jax.device_get(totals)
    n = int(t["count"])
    return {"loss": float(t["loss_sum"]) / max(n, 1), "accuracy": int(t["correct"]) / max(n, 1), "count": n}
