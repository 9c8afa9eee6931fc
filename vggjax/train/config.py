"""The book's workflow settings: `Config`, its checks and its command-line flags (one flag per field)."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from vggjax.train.splits import PIPELINES
from vggjax.utils.memory import memory_bytes, shortfall
from vggjax.train import augmentation
from vggjax.model.vgg import MIN_SIZE
from vggjax.model.summary import min_forward_bytes
from vggjax.weights.preprocessing import MODES

PHASES = ("features", "frozen", "finetune")
# Config.precision -> the compute dtype of every phase (None: the model's own float32).
# "bf16" is Keras' mixed_bfloat16: bf16 activations, fp32 parameters, optimizer state and loss.
PRECISIONS = {"fp32": None, "bf16": jnp.bfloat16}
# Deep Learning with Python, 1st edition, chapter 5.3: epochs and RMSprop learning rates.
BOOK_EPOCHS = {"features": 30, "frozen": 30, "finetune": 100}
BOOK_LEARNING_RATES = {"features": 2e-5, "frozen": 2e-5, "finetune": 1e-5}
PHASE_FREEZING = {"features": "all", "frozen": "head", "finetune": "block5+head"}  # freezing presets
EVALUATE = ("best", "last")  # Config.evaluate: the best epoch's parameters (by validation loss) or the last


def _flag(default, help: str, parse: Callable | None = None, **kwargs):
    """A Config field that is also a command-line flag (`add_arguments`): --name-with-dashes,
    parsed by `parse` (default: the default's type; a bool is a switch)."""
    key = "default_factory" if callable(default) and not isinstance(default, type) else "default"
    return dataclasses.field(**{key: default}, metadata=dict(help=help, parse=parse, **kwargs))


def _phases(text: str) -> tuple[str, ...]:
    return tuple(filter(None, text.split(",")))


def _per_phase(text: str) -> dict[str, int]:
    try:
        return dict.fromkeys(PHASES, int(text))
    except ValueError:  # argparse would name this function: "invalid _per_phase value"
        raise argparse.ArgumentTypeError(f"expected one integer for every phase, found {text!r}") from None


@dataclasses.dataclass(frozen=True)
class Config:
    """One run of the workflow. Defaults are the book's (1st edition) protocol.

    data: "tfds" (cats_vs_dogs, sliced as `splits.BOOK_SPLITS`) or a folder DIR/{train,validation,test}/
    <class>/*.jpg. weights: a converted weights directory (`vggjax.load`). preprocess: None for
    the weights' own mode, or e.g. "rescale" to reproduce the 1st edition (x/255 fed to caffe
    weights). steps_per_epoch caps each epoch's batches (None: the whole train split).
    """

    weights: str
    workdir: str
    data: str = _flag("tfds", "'tfds' (cats_vs_dogs) or DIR/{train,validation,test}/<class>/*.jpg")
    phases: tuple[str, ...] = _flag(PHASES, f"comma-separated, from {','.join(PHASES)}", _phases)
    image_size: int = _flag(150, "square input size in pixels")
    batch_size: int = _flag(20, "examples per (global) batch")
    epochs: Mapping[str, int] = _flag(lambda: dict(BOOK_EPOCHS), "one value for every phase "
                                      "(default: the book's " + "/".join(map(str, BOOK_EPOCHS.values()))
                                      + ")", _per_phase)
    learning_rates: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(BOOK_LEARNING_RATES))
    steps_per_epoch: int | None = _flag(None, "cap on the training batches of an epoch", int)
    preprocess: str | None = _flag(None, "default: what the weights expect (caffe for Keras "
                                   "weights)", str, choices=sorted(MODES))
    augment: augmentation.AugmentConfig = augmentation.FIRST_EDITION
    head_units: int = 256
    dropout_rate: float = 0.5
    seed: int = _flag(0, "seeds the head's initialisation, shuffling, dropout and augmentation")
    checkpoint_every: int | None = _flag(100, "steps between mid-epoch checkpoints")
    tfds_data_dir: str | None = None
    # Split each global batch over all devices (of every process: see vggjax.train.parallel for the
    # multi-host launch); batch_size is the global batch and must divide by the device count.
    data_parallel: bool = _flag(False, "split each batch over all devices, multi-host too (see "
                                "vggjax.train.parallel); --batch-size is the global batch and must "
                                "divide by the device count")
    # Which parameters each phase tests and exports (results.json's "tested_epoch").
    evaluate: str = _flag("best", "which parameters each phase tests and exports: best (the epoch "
                          "with the lowest validation loss, as the book's ModelCheckpoint("
                          "save_best_only=True)) or last", str, choices=EVALUATE)
    patience: int | None = _flag(None, "stop a phase after this many epochs without a lower "
                                 "validation loss (Keras' EarlyStopping(patience)); default: never", int)
    progress: bool = True  # progress bars (the command lines' --quiet turns them off)
    # "auto": the fastest conv for the device, dtype and CPU (vggjax.model.conv.choose_impl
    # states the policy). The exact-parity default of VGG itself stays "direct".
    conv_impl: str = "auto"
    # "bf16": every phase (feature extraction too) computes in bfloat16 with fp32 parameters,
    # optimizer state and loss; on CPUs with AVX512-BF16/AMX "auto" then runs oneDNN's bf16 conv.
    precision: str = _flag("fp32", "bf16: bfloat16 compute, fp32 parameters, optimizer state and "
                           "loss (fast on AVX512-BF16/AMX CPUs)", str, choices=sorted(PRECISIONS))
    # Which module decodes the images: tf.data (the train extra) or Grain (the grain extra, no
    # TensorFlow; tfds cats_vs_dogs through tfds.data_source, prepared in ArrayRecord). Part of
    # the run's identity: the decoders may differ by a step.
    pipeline: str = _flag("tfdata", "input pipeline: tfdata (TensorFlow) or grain (no TensorFlow)",
                          str, choices=sorted(PIPELINES))

    def __post_init__(self):
        """Every value checked before any work: ValueError naming each bad field (and its flag)."""
        for name in ("weights", "workdir", "data", "tfds_data_dir"):  # "~/runs" as a shell would
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                object.__setattr__(self, name, os.path.expanduser(value))
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise ValueError(f"unknown phase(s) {unknown or list(self.phases)}; expected some of {PHASES}")
        for name in ("epochs", "learning_rates"):
            missing = [p for p in self.phases_to_run if p not in getattr(self, name)]
            if missing:
                raise ValueError(f"Config.{name} has no value for phase(s) {missing}")
        problems = []

        def need(ok: bool, name: str, rule: str, value) -> None:
            flag = f" (--{name.replace('_', '-')})" if name in {f.name for f in _flags()} else ""
            if not ok:
                problems.append(f"{name}{flag} must be {rule}, found {value!r}")

        def integer(value, low: int, allow_none: bool = False) -> bool:
            return (allow_none and value is None) or (type(value) is int and value >= low)

        need(integer(self.image_size, MIN_SIZE), "image_size", f"an integer >= {MIN_SIZE} (five 2x2 "
             "poolings)", self.image_size)
        need(integer(self.batch_size, 1), "batch_size", "an integer >= 1", self.batch_size)
        need(integer(self.steps_per_epoch, 1, True), "steps_per_epoch", "an integer >= 1 or None",
             self.steps_per_epoch)
        need(integer(self.checkpoint_every, 0, True), "checkpoint_every",
             "an integer >= 0 (0: at epoch ends only) or None", self.checkpoint_every)
        need(integer(self.seed, 0) and self.seed < 2**32, "seed", "an integer in [0, 2**32)", self.seed)
        need(integer(self.head_units, 1), "head_units", "an integer >= 1", self.head_units)
        need(isinstance(self.dropout_rate, (int, float)) and 0 <= self.dropout_rate < 1,
             "dropout_rate", "in [0, 1)", self.dropout_rate)
        for name, rule, ok in (("epochs", "an integer >= 0 (0: evaluate only)", lambda v: integer(v, 0)),
                               ("learning_rates", "> 0", lambda v: isinstance(v, (int, float)) and v > 0)):
            bad = {}  # one problem per wrong value, naming its phases (--epochs -1 sets all three)
            for p in self.phases_to_run:
                if not ok(getattr(self, name)[p]):
                    bad.setdefault(repr(getattr(self, name)[p]), (getattr(self, name)[p], []))[1].append(p)
            for value, phases in bad.values():
                need(False, name, f"{rule} for phase(s) {', '.join(phases)}", value)
        need(self.preprocess is None or self.preprocess in MODES, "preprocess",
             f"None or one of {sorted(MODES)}", self.preprocess)
        need(isinstance(self.data, str) and self.data != "", "data", "'tfds' or a folder", self.data)
        need(self.evaluate in EVALUATE, "evaluate", f"one of {list(EVALUATE)}", self.evaluate)
        need(integer(self.patience, 1, True), "patience", "an integer >= 1 or None", self.patience)
        need(self.precision in PRECISIONS, "precision", f"one of {sorted(PRECISIONS)}", self.precision)
        need(self.pipeline in PIPELINES, "pipeline", f"one of {sorted(PIPELINES)}", self.pipeline)
        if not problems:
            self._check_memory(problems)
        if problems:
            raise ValueError("; ".join(problems))

    def _check_memory(self, problems: list) -> None:
        """Refuse a batch that cannot fit: even its first conv layer's activations (a lower bound
        of any phase's need) exceed the memory of the devices that would hold them."""
        need = self.batch_size * min_forward_bytes(self.image_size, 2 if self.precision == "bf16" else 4)
        have = (memory_bytes() * jax.process_count() if self.data_parallel
                else memory_bytes(jax.local_devices()[:1]))
        if gap := shortfall(need, have):
            problems.append(f"batch_size (--batch-size) {self.batch_size} at image_size (--image-size) "
                            f"{self.image_size} {gap}; lower either")

    @property
    def compute_dtype(self):
        """The phases' compute dtype for `steps.make_train_step` & co (None: float32)."""
        return PRECISIONS[self.precision]

    @property
    def phases_to_run(self) -> tuple[str, ...]:
        """`phases` in the book's order, plus `frozen` when `finetune` is asked for: fine-tuning
        continues from the frozen phase's final parameters."""
        wanted = set(self.phases) | ({"frozen"} if "finetune" in self.phases else set())
        return tuple(p for p in PHASES if p in wanted)


def _flags() -> list[dataclasses.Field]:
    """The Config fields that are command-line flags."""
    return [f for f in dataclasses.fields(Config) if "help" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every Config field declared with `_flag`: --image-size, --epochs, ...

    Flags that are not given stay out of the parsed namespace (see `config_arguments`), so the
    Config's own defaults apply and a given 0 stays 0.
    """
    for f in _flags():
        meta = dict(f.metadata)
        parse, help = meta.pop("parse"), meta.pop("help")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        help += "" if default is None or isinstance(default, Mapping) else f" (default: {shown})"
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help)
        else:
            parser.add_argument(flag, type=parse or type(default), default=argparse.SUPPRESS,
                                help=help, **meta)


def config_arguments(args: argparse.Namespace) -> dict:
    """The Config fields given on the command line, as {field: value}."""
    return {f.name: getattr(args, f.name) for f in _flags() if hasattr(args, f.name)}
