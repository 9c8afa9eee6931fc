"""Neural style transfer as in "Deep Learning with Python" (1st ed. 8.3, 2nd ed. 12.3): a
combination image, started from the content image, optimised with optax against the book's loss
(vggjax.losses.perceptual presets) on a VGG19 conv base."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import optax

from vggjax.utils import atomic, images

from vggjax.losses import perceptual
from vggjax.utils.extras import require
from vggjax.utils.progress import progress_bar
from vggjax.model.vgg import MIN_SIZE, VGG
from vggjax.weights.preprocessing import deprocess_input


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How `run` optimises a preset's loss (`perceptual.PRESETS`, same name): the optimiser and
    the defaults for steps and for save_every (the interval between step_NNNNN.png images)."""

    make_optimizer: Callable[[], optax.GradientTransformation]
    steps: int
    save_every: int
    line_search: bool  # L-BFGS: the value and gradient come from the optimiser's state


SCHEDULES = {
    # Each step is one L-BFGS iteration with its line search (the book ran scipy's L-BFGS for
    # 20 rounds of at most 20 evaluations).
    "book1": Schedule(optax.lbfgs, steps=200, save_every=20, line_search=True),
    # The book's 4000 SGD steps at 100 * 0.96 ** (step / 100) (Keras' ExponentialDecay, no staircase).
    "book2": Schedule(lambda: optax.sgd(optax.exponential_decay(100.0, transition_steps=100,
                                                                decay_rate=0.96)),
                      steps=4000, save_every=100, line_search=False),
}


def schedule(preset: str) -> Schedule:
    """The `Schedule` of a preset name; ValueError naming the presets for any other name."""
    if preset not in SCHEDULES:
        raise ValueError(f"unknown style-transfer preset {preset!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[preset]


def optimizer(preset: str) -> optax.GradientTransformation:
    """The book's optimiser for a preset: L-BFGS (book1) or SGD with a decaying rate (book2)."""
    return schedule(preset).make_optimizer()


def image_size(path: str | os.PathLike, height: int) -> tuple[int, int]:
    """(height, width) keeping the aspect ratio of the image at `path`, as the book sizes it."""
    with _pil().open(path) as img:
        w, h = img.size
    width = int(w * height / h)
    if min(height, width) < MIN_SIZE:
        raise ValueError(f"{path}: at height {height} the image is {height}x{width}; VGG needs at "
                         f"least {MIN_SIZE}x{MIN_SIZE}")
    return height, width


def _pil():
    return require("PIL.Image", "style transfer (reading and writing images)")


def check_settings(preset: str = "book1", steps: int | None = None, height: int = 400,
                   save_every: int | None = None) -> dict:
    """Raise ValueError naming the first setting `run` cannot use; return {"preset", "steps",
    "height", "save_every"} with the preset's defaults filled in."""
    defaults = schedule(preset)
    steps = defaults.steps if steps is None else steps
    save_every = defaults.save_every if save_every is None else save_every
    for name, value in (("steps", steps), ("save_every", save_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, found {value!r}")
    if not isinstance(height, int) or height < MIN_SIZE:
        raise ValueError(f"height must be an integer >= {MIN_SIZE}, found {height!r}")
    return {"preset": preset, "steps": steps, "height": height, "save_every": save_every}


def check_inputs(content_path, style_path, out_dir, preset: str = "book1", steps: int | None = None,
                 height: int = 400, save_every: int | None = None) -> dict:
    """`check_settings`, then the files: raise ValueError naming the first thing `run` cannot
    use, before any work; return the settings plus "size", the (H, W) images are resized to."""
    checked = check_settings(preset, steps, height, save_every)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    for path in outputs(out_dir, checked["steps"], checked["save_every"]):
        atomic.check_target(path, directory=False)  # a user's final.png is never replaced
    for path in (content_path, style_path):
        images.load_image(path)  # ValueError naming the file: missing, unreadable, a bomb
    return dict(checked, size=image_size(content_path, height))


def outputs(out_dir, steps: int, save_every: int) -> list[Path]:
    """The files `run` writes into `out_dir`: step_NNNNN.png (every `save_every` steps and the
    last), final.png, loss.png."""
    out_dir = Path(out_dir)
    shown = sorted({*range(0, steps + 1, save_every), steps})
    return [out_dir / f"step_{i:05d}.png" for i in shown] + [out_dir / "final.png", out_dir / "loss.png"]


def optimise(model: VGG, variables: Mapping, content, style, preset: str = "book1",
             steps: int = 200) -> Iterator[tuple[int, jnp.ndarray, float]]:
    """Yield (step, combination, loss) for step = 0 .. steps: the combination image (1, H, W, 3)
    in the model's input space and the book's loss of that image (step 0: the content image).

    content, style: (1, H, W, 3) and (1, H', W', 3), preprocessed for the weights.
    """
    targets = perceptual.style_transfer_targets(model, variables, content, style, preset)
    x = jnp.asarray(content, jnp.float32)
    state = optimizer(preset).init(x)
    for i in range(steps):
        new_x, state, value = _step(model, preset, x, state, variables, targets)
        if not math.isfinite(value):  # NaN in, NaN forever: stop, do not draw nonsense
            raise ValueError(f"style transfer: the loss is {float(value)} at step {i}; the weights or "
                             "the images hold values the loss cannot use (check the weights with "
                             "vggjax.load, and that the images are ordinary photos)")
        yield i, x, float(value)
        x = new_x
    yield steps, x, float(_loss(model, preset, x, variables, targets))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss(model: VGG, preset: str, x, variables, targets):
    return jnp.sum(perceptual.style_transfer_loss(model, variables, x, targets, preset)[0])


# Module level, so that runs with the same model, preset and image size reuse one compilation.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(model: VGG, preset: str, x, state, variables, targets):
    opt = optimizer(preset)
    value_fn = functools.partial(_loss, model, preset, variables=variables, targets=targets)
    if schedule(preset).line_search:  # the line search's last value and gradient are in the state
        value, grad = optax.value_and_grad_from_state(value_fn)(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=value_fn)
    else:
        value, grad = jax.value_and_grad(value_fn)(x)
        updates, state = opt.update(grad, state, x)
    return optax.apply_updates(x, updates), state, value


def run(pretrained, content_path, style_path, out_dir, preset: str = "book1", steps: int | None = None,
        height: int = 400, save_every: int | None = None, progress: bool = True) -> dict:
    """Style-transfer `content_path` with `style_path`'s style on `pretrained` (a `vggjax.load`
    result, VGG19 in the book) and write to `out_dir`: `step_NNNNN.png` every `save_every` steps
    and at the end, `final.png`, and `loss.png` (the loss curve). Returns {"losses", "final"}.
    """
    checked = check_inputs(content_path, style_path, out_dir, preset, steps, height, save_every)
    steps, save_every = checked["steps"], checked["save_every"]
    content = pretrained.preprocess(images.load_image(content_path, checked["size"])[None])
    style = pretrained.preprocess(images.load_image(style_path, checked["size"])[None])  # the book resizes both alike
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = pretrained.meta["preprocessing"]
    history = []
    bar = progress_bar(total=steps, enabled=progress, desc=f"style transfer ({preset})", unit="step")
    for i, x, value in optimise(pretrained.model, pretrained.variables, content, style, preset, steps):
        history.append(value)
        if i % save_every == 0 or i == steps:
            images.save_png(out_dir / f"step_{i:05d}.png", deprocess_input(x, mode)[0])  # = outputs()
        if i < steps:
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            bar.update(1)
    bar.close()
    images.save_png(out_dir / "final.png", deprocess_input(x, mode)[0])
    plot_losses(history, out_dir / "loss.png", preset)
    return {"losses": history, "final": out_dir / "final.png"}


def plot_losses(history, path, preset: str) -> None:
    """The loss curve as a PNG (matplotlib, an optional dependency, imported here)."""
    fig = require("matplotlib.figure", "the style-transfer loss curve").Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(range(len(history)), history)
    ax.set(xlabel="step", ylabel=f"loss ({preset})", yscale="log", title="style transfer")
    fig.tight_layout()
    with atomic.writing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
