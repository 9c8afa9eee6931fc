"""The book's three transfer-learning phases as library functions, driven by one `Config`.

- `features`: run the conv base once over every split (cached, `vggjax.train.feature_cache`), train a fresh
  `Head` on the stored features (no augmentation). Book: ~90% validation accuracy.
- `frozen`: conv base frozen, fresh head, images augmented on the device (the 1st edition's
  ImageDataGenerator recipe by default). Book: ~90% when the base is truly frozen.
- `finetune`: starts from `frozen`'s final parameters, unfreezes block5 with a new optimizer
  (RMSprop 1e-5) and a new compiled step. Book: 96.8% test accuracy.

Every phase logs its trainable-parameter report, trains with `loop.fit` (resumable, even
after kill -9; a finished phase is not retrained), evaluates its final parameters on the test
split and exports its classifier. `finetune` needs `frozen`: asking for it runs (or, when
finished, restores) `frozen` first.

Output directory (`Config.workdir`):

    config.json                the last run's Config
    features_cache/            <split>-<key>/{features.npy, labels.npy, info.json} (features phase)
    checkpoints/<phase>/       Orbax checkpoints of loop.fit: the 2 latest and the best epoch
    history.json               {phase: [{"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}]}
    results.json               {phase: {"test_accuracy", "test_loss", ...}}
    curves.png                 accuracy and loss per epoch, one column per phase
    export/<phase>/            the phase's classifier: base/ (vggjax.load), head.safetensors,
                               classifier.json; `classifier.load_classifier` / `classifier.predict`

`add_arguments` turns the Config's fields into command-line flags (their defaults and help live
here, once), `config_arguments` reads them back.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vggjax.utils import atomic

from vggjax.train import splits
from vggjax.train.splits import PIPELINES, PIXELS
from vggjax.utils.memory import memory_bytes
from vggjax.train import augmentation, feature_cache, freezing, parallel, report, loop
from vggjax.inference.classifier import (CLASSIFIER, Classifier, Head, TrainedClassifier, export,
                               init_classifier)
from vggjax.model.vgg import MIN_SIZE, create, without_top
from vggjax.model.summary import min_forward_bytes
from vggjax.weights.preprocessing import MODES
from vggjax.utils.trees import digest
from vggjax.weights import download, store

PHASES = ("features", "frozen", "finetune")
# Config.precision -> the compute dtype of every phase (None: the model's own float32).
# "bf16" is Keras' mixed_bfloat16: bf16 activations, fp32 parameters, optimizer state and loss.
PRECISIONS = {"fp32": None, "bf16": jnp.bfloat16}
# Deep Learning with Python, 1st edition, chapter 5.3: epochs and RMSprop learning rates.
BOOK_EPOCHS = {"features": 30, "frozen": 30, "finetune": 100}
BOOK_LEARNING_RATES = {"features": 2e-5, "frozen": 2e-5, "finetune": 1e-5}
PHASE_FREEZING = {"features": "all", "frozen": "head", "finetune": "block5+head"}  # freezing presets
SPLITS = ("train", "validation", "test")
_KERAS_NOTOP = download.official_file("keras", "vgg16", include_top=False)


def _flag(default, help: str, parse: Callable | None = None, **kwargs):
    """A Config field that is also a command-line flag (`add_arguments`): --name-with-dashes,
    parsed by `parse` (default: the default's type; a bool is a switch)."""
    key = "default_factory" if callable(default) and not isinstance(default, type) else "default"
    return dataclasses.field(**{key: default}, metadata=dict(help=help, parse=parse, **kwargs))


def _phases(text: str) -> tuple[str, ...]:
    return tuple(filter(None, text.split(",")))


def _per_phase(text: str) -> dict[str, int]:
    return dict.fromkeys(PHASES, int(text))


@dataclasses.dataclass(frozen=True)
class Config:
    """One run of the workflow. Defaults are the book's (1st edition) protocol.

    data: "tfds" (cats_vs_dogs, sliced 2000/1000/1000) or a folder DIR/{train,validation,test}/
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
    progress: bool = True
    # "auto" (vggjax.model.conv.choose_impl): on one CPU device, oneDNN where it suits the
    # dtype (fp32 from AVX2 up, as Winograd F(4,3) on oneDNN's matmul from block1_conv2 on;
    # bf16 on AVX512-BF16/AMX), else XLA-side Winograd for fp32 convs wider than 64x64 (~1e-5
    # relative rounding); on GPU/TPU or several devices,
    # XLA's own conv. The exact-parity default of VGG itself stays "direct" (see benchmarks/).
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
        for p in self.phases_to_run:
            need(integer(self.epochs[p], 0), "epochs", "an integer >= 0 (0: evaluate only) for "
                 f"phase {p}", self.epochs[p])
            rate = self.learning_rates[p]
            need(isinstance(rate, (int, float)) and rate > 0, "learning_rates", f"> 0 for phase {p}", rate)
        need(self.preprocess is None or self.preprocess in MODES, "preprocess",
             f"None or one of {sorted(MODES)}", self.preprocess)
        need(isinstance(self.data, str) and self.data != "", "data", "'tfds' or a folder", self.data)
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
        if need > have:
            problems.append(f"batch_size (--batch-size) {self.batch_size} at image_size (--image-size) "
                            f"{self.image_size} needs at least {need / 2**30:.1f} GiB for its first conv "
                            f"layer alone, more than the {have / 2**30:.1f} GiB here; lower either")

    @property
    def compute_dtype(self):
        """The phases' compute dtype for `loop.make_train_step` & co (None: float32)."""
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


@dataclasses.dataclass
class _Run:
    """What the phases share: config, loaded weights and splits, the output paths."""

    config: Config
    weights: store.Pretrained
    base_model: Any
    base_variables: dict
    mode: str
    splits: dict
    mesh: Any
    log: Callable[[str], Any]
    run_sha256: str  # digest of the run's identity (run.json), stored with checkpoints and results

    @property
    def workdir(self) -> Path:
        return Path(self.config.workdir).absolute()

    def head(self) -> Head:
        n = len(self.splits["train"].class_names)
        return Head(units=self.config.head_units, dropout_rate=self.config.dropout_rate,
                    num_outputs=1 if n == 2 else n)

    def key(self, phase: str) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(self.config.seed), PHASES.index(phase))

    def start(self, phase: str, variables: Mapping):
        """(state, tx) for a phase: the book's RMSprop on what PHASE_FREEZING[phase] trains; logs
        the trainable-parameter report."""
        params = variables["params"]
        spec = PHASE_FREEZING[phase]
        self.log(f"phase {phase}: " + freezing.trainable_report(params, freezing.labels(params, spec)))
        tx = freezing.make_optimizer(freezing.book_rmsprop(self.config.learning_rates[phase]), params, spec)
        state = loop.TrainState.create(variables, tx, self.config.seed)
        return (parallel.replicate(state, self.mesh) if self.mesh else state), tx

    def fit(self, phase: str, state, train_step, eval_step, train_split, val_split):
        cap = self.config.steps_per_epoch
        return loop.fit(state, train_step, eval_step, train_split, val_split,
                            epochs=self.config.epochs[phase], workdir=self.workdir / "checkpoints",
                            phase=phase, identity=self.identity(phase),
                            steps_per_epoch=min(cap, train_split.steps_per_epoch) if cap else None,
                            checkpoint_every=self.config.checkpoint_every, mesh=self.mesh,
                            log=self.log, progress=self.config.progress)

    def identity(self, phase: str) -> dict:
        """What a checkpoint of `phase` must match to be resumed: the run, freezing rules, seed."""
        return {"run_sha256": self.run_sha256, "seed": self.config.seed,
                "freeze_spec": [list(r) for r in freezing.resolve(PHASE_FREEZING[phase])]}

    def finish(self, phase: str, state, history: list, eval_step, test_split, model: Classifier,
               variables: Mapping) -> dict:
        """Test accuracy, history.json, results.json, curves.png and export/<phase> (the classifier
        `model` with `variables`); a phase already finished and reported (same history, export
        present) is not redone."""
        export_dir = self.workdir / "export" / phase
        done = _read_json(self.workdir / report.RESULTS).get(phase)
        if (done and _read_json(self.workdir / report.HISTORY).get(phase) == history
                and (export_dir / CLASSIFIER).is_file()):
            self.log(f"phase {phase}: already reported (test accuracy {done['test_accuracy']:.4f})")
            return done
        test = loop.evaluate(state, eval_step, test_split, self.mesh)
        result = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                  "test_examples": test["count"], "epochs": len(history),
                  "final_val_accuracy": history[-1]["val_accuracy"] if history else None,
                  "best_val_accuracy": max((r["val_accuracy"] for r in history), default=None),
                  "image_size": self.config.image_size, "preprocessing": self.mode,
                  "run_sha256": self.run_sha256}
        self.log(f"phase {phase}: test accuracy {test['accuracy']:.4f} "
                 f"({test['count']} images), test loss {test['loss']:.4f}")
        if jax.process_index() != 0:  # every process evaluates (a collective); one writes
            return result
        histories = report.update_json(self.workdir / report.HISTORY, phase, history)
        report.update_json(self.workdir / report.RESULTS, phase, result)
        if any(histories.values()):  # --epochs 0 trains nothing: no curves to draw
            report.plot_curves({p: histories[p] for p in PHASES if p in histories},
                               self.workdir / report.CURVES)
        classifier = TrainedClassifier(
            model=model, variables=dict(variables), preprocessing=self.mode,
            image_size=self.config.image_size, class_names=self.splits["train"].class_names)
        export(export_dir, classifier, self.weights.meta, info={"phase": phase, **result},
               overwrite=True)
        return result


class MissingInputError(RuntimeError):
    """The weights or the images a run needs are not on this machine and cannot be fetched."""


def resolve_weights(weights: str | None, log: Callable[[str], Any] = print) -> str:
    """The weights directory a run uses: `weights` when given (it must exist), else the cached
    conversion of Keras' VGG16 no-top file, downloaded (checksum-verified) and converted on first
    use. Raises MissingInputError saying what to provide when that is impossible (offline)."""
    how = ("provide converted weights with --weights DIR, made from Keras' "
           f"{_KERAS_NOTOP.filename} ({_KERAS_NOTOP.url}) by\n"
           f"  python tools/convert_weights.py --source keras --arch vgg16 "
           f"--input {_KERAS_NOTOP.filename} --output DIR")
    if weights is not None:
        if not (Path(weights) / store.METADATA).is_file():
            raise MissingInputError(f"--weights {weights} is not a converted weights directory "
                                    f"(no {store.METADATA} in it); {how}")
        return str(weights)
    default = store.default_output_dir("keras", "vgg16", include_top=False)
    if not (default / store.METADATA).is_file():
        log(f"weights: converting Keras VGG16 (no top) into {default}")
        try:
            store.convert_file("keras", "vgg16", None, default, include_top=False)
        except download.DownloadError as err:
            raise MissingInputError(f"no VGG16 weights: {err}\nInstead, {how}") from None
    return str(default)


def check_data(data: str) -> None:
    """Raise MissingInputError, saying what to provide, when `data` is a folder without the
    book's layout ("tfds" is checked by tfds itself when the run loads it)."""
    how = ("provide the images with --data DIR in the book's layout: DIR/train/cats/*.jpg, "
           "DIR/train/dogs/*.jpg, and the same under DIR/validation and DIR/test "
           "(the book: 1000+1000, 500+500, 500+500 images)")
    if data != "tfds":
        missing = [s for s in SPLITS if not (Path(data) / s).is_dir()]
        if missing:
            raise MissingInputError(f"--data {data} lacks the folder(s) {missing}; {how}")


def resolve_inputs(weights: str | None, data: str, log: Callable[[str], Any] = print) -> str:
    """`resolve_weights` and `check_data` together: the weights directory to use, or one
    MissingInputError naming everything that is missing and how to provide it."""
    problems = []
    try:
        weights = resolve_weights(weights, log)
    except MissingInputError as err:
        problems.append(str(err))
    try:
        check_data(data)
    except MissingInputError as err:
        problems.append(str(err))
    if problems:
        raise MissingInputError("\n".join(problems))
    return weights


def conv_base(weights: store.Pretrained, conv_impl: str = "direct"):
    """(headless VGG, its variables) of loaded weights; a checkpoint with a classifier loses it."""
    model = create(weights.meta["arch"], include_top=False, conv_impl=conv_impl)
    variables = dict(weights.variables)
    variables["params"] = without_top(variables["params"])
    return model, variables


RUN = "run.json"  # the run's identity, written into its workdir before any work
# What a workdir holds for a run: all that `--restart` deletes (nothing else in the workdir).
RUN_OUTPUTS = (RUN, "config.json", "checkpoints", "features_cache", "export", report.HISTORY,
               report.RESULTS, report.CURVES)
# Config fields that do not change what a run computes: not part of its identity. `weights` and
# `data` enter as the weights' digest and the data's fingerprint, not as paths.
_NOT_IDENTITY = {"weights", "workdir", "data", "phases", "epochs", "progress", "checkpoint_every",
                 "data_parallel", "tfds_data_dir"}


class RunMismatchError(ValueError):
    """The workdir holds another run; resuming there would mix two runs."""


def data_fingerprint(data: str) -> str:
    """sha256 of every file's path, size and mtime under the folder `data` (or of "tfds")."""
    h = hashlib.sha256()
    if data == "tfds":
        h.update(b"tfds cats_vs_dogs")  # its slicing is fixed per vggjax version, also in the identity
        return h.hexdigest()
    root = Path(data)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def run_identity(config: Config, weights_meta: Mapping, weights_sha256: str, mode: str) -> dict:
    """What makes two runs the same run: weights digest, data fingerprint, every Config field
    that changes the computation (image size, batch size, seed, augmentation, ...), the
    preprocessing mode, the pipeline's pixel revision (`splits.PIXELS`) and the vggjax version. Stored as workdir/run.json."""
    from vggjax import __version__

    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IDENTITY}
    return json.loads(json.dumps({"weights_sha256": weights_sha256, "arch": weights_meta["arch"],
                                  "data": data_fingerprint(config.data), **fields,
                                  "preprocess": mode, "pixels": PIXELS[config.pipeline],
                                  "vggjax_version": __version__}, default=str))


def claim_workdir(workdir: Path, identity: Mapping, restart: bool = False,
                  log: Callable[[str], Any] = print) -> None:
    """Make `workdir` this run's: resume only when its run.json is `identity`.

    A workdir of another run (or of a run without run.json) raises RunMismatchError naming what
    differs, unless `restart`, which deletes that run's outputs: what vggjax wrote there,
    proven by the manifests (`atomic.remove_owned`); a user's file among them is refused before
    anything is deleted. Outputs without run.json that no manifest proves vggjax's (an older
    vggjax's, or the user's under vggjax's names) are refused even with `restart`. OSError (one line) when the workdir cannot be created or written.
    """
    make_workdir(workdir)
    path = workdir / RUN
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is None and any((workdir / name).exists() for name in RUN_OUTPUTS[1:]):
        old = {}  # outputs without an identity: made by an older vggjax, or damaged
    if old == {} and (others := atomic.unowned(workdir, RUN_OUTPUTS)):
        # An older vggjax wrote no manifests: --restart could not delete these either.
        raise RunMismatchError(f"--workdir {workdir} holds outputs without {RUN} that vggjax did not "
                               f"write ({others}): an older vggjax's or your own; remove them by hand "
                               "or use another --workdir")
    if old is not None and old != identity:
        if not restart:
            differs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
            shown = ", ".join(f"{k} ({_short(old.get(k))} there, {_short(identity.get(k))} now)"
                              for k in differs[:6]) + (" ..." if len(differs) > 6 else "")
            if not old:
                shown = f"vggjax's outputs without their {RUN}"
            raise RunMismatchError(f"--workdir {workdir} holds another run: {shown}; use another "
                                   "--workdir, or --restart to discard that run")
    if jax.process_index() != 0:  # multi-host: every process checks, one writes
        return
    if restart:
        atomic.remove_owned([workdir / name for name in RUN_OUTPUTS])
        log(f"--restart: discarded the run in {workdir}")
    with atomic.writing(path) as tmp:
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


def make_workdir(workdir: Path) -> None:
    """Create `workdir`; OSError (one line) when it cannot be created or written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise PermissionError(f"--workdir {workdir} is not writable")
    except OSError as err:
        raise OSError(f"cannot use --workdir {workdir}: {err.strerror or err}") from None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if value is not None else "absent"
    return text if len(text) <= 40 else text[:16] + "..."


def run(config: Config, log: Callable[[str], Any] = print, restart: bool = False) -> dict:
    """Run `config.phases` (plus `frozen` when `finetune` needs it) in the book's order.

    Before any work: the data folder is checked (`data.check_image_folder`), the weights loaded
    and verified, and the workdir claimed (`claim_workdir`: a workdir of another run is refused
    unless `restart`). Returns {phase: results} for the phases run now (also merged into
    workdir/results.json).
    """
    n_proc = jax.process_count()
    if n_proc > 1 and not config.data_parallel:
        raise ValueError(f"{n_proc} processes were started: multi-host runs need data_parallel")
    if n_proc > 1 and "features" in config.phases_to_run:
        raise ValueError("the features phase (one pass of the conv base, then a tiny head) runs "
                         "in a single process; run the frozen and finetune phases multi-host")
    if config.data != "tfds":
        splits.check_image_folder(config.data, SPLITS)
    weights = store.load(config.weights)
    mode = config.preprocess or weights.meta["preprocessing"]
    sha = weights.meta.get("variables_sha256") or digest(weights.variables)
    identity = run_identity(config, weights.meta, sha, mode)
    workdir = Path(config.workdir).absolute()
    make_workdir(workdir)
    # One run at a time in a workdir (process 0 of a multi-host job stands for the job).
    lock = (atomic.locked(workdir, f"--workdir {workdir}") if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        claim_workdir(workdir, identity, restart, log)
        return _run(config, weights, mode, identity, workdir, log)


def _run(config: Config, weights: store.Pretrained, mode: str, identity: Mapping, workdir: Path,
         log: Callable[[str], Any]) -> dict:
    """`run` after the checks, in the claimed and locked workdir."""
    load_split = splits.loader(config.pipeline, config.tfds_data_dir)
    n_proc = jax.process_count()
    if jax.process_index() == 0:
        with atomic.writing(workdir / "config.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n")
    base_model, base_variables = conv_base(weights, config.conv_impl)

    # One input pipeline per process, each reading its rows of every global batch.
    loaded = {name: load_split(config.data, name, config.image_size, config.batch_size,
                               shuffle=name == "train", seed=config.seed).shard(jax.process_index(), n_proc)
              for name in SPLITS}
    mesh = parallel.make_mesh() if config.data_parallel else None
    log(f"data {config.data}: " + ", ".join(f"{n} {s.num_examples}" for n, s in loaded.items())
        + f" images at {config.image_size}x{config.image_size}, classes {list(loaded['train'].class_names)}; "
        f"weights {config.weights} ({weights.meta['arch']}), preprocessing {mode!r}"
        + (f"; batches split over {mesh.size} devices" if mesh else ""))
    run_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    r = _Run(config, weights, base_model, base_variables, mode, loaded, mesh, log, run_sha256)

    phases = config.phases_to_run
    if "frozen" in phases and "frozen" not in config.phases:
        log("phase finetune continues from phase frozen: running (or restoring) it first")
    results = {}
    if "features" in phases:
        results["features"] = features_phase(r)
    if "frozen" in phases:
        results["frozen"], frozen = frozen_phase(r)
    if "finetune" in phases:
        results["finetune"] = finetune_phase(r, *frozen)
    return results


def features_phase(r: _Run) -> dict:
    """Feature extraction: conv features computed once (cached), a fresh head trained on them."""
    base = loop.with_compute_dtype(r.base_model, r.config.compute_dtype)
    feats = feature_cache.extract(base, r.base_variables, r.splits, r.workdir / "features_cache",
                             preprocess_mode=r.mode, weights_meta=r.weights.meta, log=r.log)
    head = r.head()
    state, tx = r.start("features", head.init(r.key("features"), np.asarray(feats["train"].features[:1])))
    train_step = loop.make_train_step(head, tx, input_key="features", mesh=r.mesh,
                                          compute_dtype=r.config.compute_dtype)
    eval_step = loop.make_eval_step(head, input_key="features", mesh=r.mesh,
                                        compute_dtype=r.config.compute_dtype)
    state, history = r.fit("features", state, train_step, eval_step, feats["train"], feats["validation"])
    # Exported as the original base under the trained head: the same predictions, from images.
    variables = {k: {"base": v} for k, v in r.base_variables.items()}
    variables["params"]["head"] = state.params
    return r.finish("features", state, history, eval_step, feats["test"],
                    Classifier(base=r.base_model, head=head), variables)


def frozen_phase(r: _Run):
    """Frozen conv base, fresh head, on-device augmentation. Returns (results, (model, state,
    eval_step)), what `finetune_phase` continues from."""
    model, variables = init_classifier(r.base_variables, r.base_model, r.head(), r.config.image_size,
                                       r.key("frozen"))
    state, tx = r.start("frozen", variables)
    train_step = loop.make_train_step(model, tx, augment=r.config.augment, preprocess_mode=r.mode,
                                          mesh=r.mesh, compute_dtype=r.config.compute_dtype)
    eval_step = loop.make_eval_step(model, preprocess_mode=r.mode, mesh=r.mesh,
                                        compute_dtype=r.config.compute_dtype)
    state, history = r.fit("frozen", state, train_step, eval_step, r.splits["train"], r.splits["validation"])
    results = r.finish("frozen", state, history, eval_step, r.splits["test"], model, state.variables())
    return results, (model, state, eval_step)


def finetune_phase(r: _Run, model: Classifier, frozen_state, eval_step) -> dict:
    """Unfreeze block5 from the frozen phase's final parameters: new optimizer, new train step."""
    state, tx = r.start("finetune", frozen_state.variables())
    train_step = loop.make_train_step(model, tx, augment=r.config.augment, preprocess_mode=r.mode,
                                          mesh=r.mesh, compute_dtype=r.config.compute_dtype)
    # Same model and inputs as the frozen phase: its compiled eval step is reused.
    state, history = r.fit("finetune", state, train_step, eval_step, r.splits["train"],
                           r.splits["validation"])
    return r.finish("finetune", state, history, eval_step, r.splits["test"], model, state.variables())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
