"""The book's three transfer-learning phases as library functions, driven by one `Config`.

- `features`: run the conv base once over every split (cached, `vggjax.train.feature_cache`), train a fresh
  `Head` on the stored features (no augmentation). Book: ~90% validation accuracy.
- `frozen`: conv base frozen, fresh head, images augmented on the device (the 1st edition's
  ImageDataGenerator recipe by default). Book: ~90% when the base is truly frozen.
- `finetune`: starts from `frozen`'s final parameters, unfreezes block5 with a new optimizer
  (RMSprop 1e-5) and a new compiled step. Book: 96.8% test accuracy.

Every phase logs its trainable-parameter report, trains with `loop.fit` (resumable, even
after kill -9; a finished phase is not retrained; `Config.patience` stops it early), evaluates
on the test split the parameters of its best epoch (lowest validation loss, the book's
`ModelCheckpoint(save_best_only=True)`; `Config.evaluate="last"`: its final ones) and exports
them as its classifier. Progress bars and log lines (`logging`, logger "vggjax") show every
long step; TensorBoard event files record every epoch. `finetune` needs `frozen`: asking for it runs (or, when
finished, restores) `frozen` first.

Output directory (`Config.workdir`):

    config.json                the last run's Config
    features_cache/            <split>-<key>/{features.npy, labels.npy, info.json} (features phase)
    checkpoints/<phase>/       Orbax checkpoints of loop.fit: the 2 latest and the best epoch
    history.json               {phase: [{"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}]}
    results.json               {phase: {"test_accuracy", "test_loss", "evaluate", "tested_epoch", ...}}
    curves.png                 accuracy and loss per epoch, one column per phase, and smoothed
    tensorboard/<phase>/{train,validation}/   event files: epoch_loss, epoch_accuracy (both),
                               epoch_learning_rate and epoch_images_per_second (train), per epoch
    classifiers/<phase>/       the phase's classifier: base/ (vggjax.load), head.safetensors,
                               classifier.json; `classifier.load_classifier` / `classifier.predict`

The settings and their flags live in `vggjax.train.config`, the inputs' checks in
`vggjax.train.inputs`, the run's identity and workdir ownership in `vggjax.train.run_identity`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from vggjax.utils import atomic, locks

from vggjax.train import splits
from vggjax.train import feature_cache, freezing, loop, metric_writers, parallel, report, steps, synthetic
from vggjax.model.compute_dtype import with_compute_dtype
from vggjax.inference.heads import Classifier, Head, init_classifier
from vggjax.inference.classifier import CLASSIFIER, TrainedClassifier, save, load_classifier
from vggjax.utils.trees import digest
from vggjax.weights import download, store
from vggjax.train.config import PHASE_FREEZING, PHASES, Config
from vggjax.train.inputs import conv_base
from vggjax.train.run_identity import CLASSIFIERS, claim_workdir, make_workdir, run_identity

logger = logging.getLogger(__name__)
MONITOR = "val_loss"  # the best epoch's metric, as the book's ModelCheckpoint


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
        logger.info(f"phase {phase}: " + freezing.trainable_report(params, freezing.labels(params, spec)))
        tx = freezing.make_optimizer(freezing.book_rmsprop(self.config.learning_rates[phase]), params, spec)
        state = steps.TrainState.create(variables, tx, self.config.seed)
        return (parallel.replicate(state, self.mesh) if self.mesh else state), tx

    def fit(self, phase: str, state, train_step, eval_step, train_split, val_split):
        cap, c = self.config.steps_per_epoch, self.config
        writer = metric_writers.TensorBoard(self.workdir / metric_writers.TENSORBOARD / phase)
        try:
            return loop.fit(state, train_step, eval_step, train_split, val_split,
                            epochs=c.epochs[phase], workdir=self.workdir / "checkpoints",
                            phase=phase, identity=self.identity(phase),
                            steps_per_epoch=min(cap, train_split.steps_per_epoch) if cap else None,
                            checkpoint_every=c.checkpoint_every, mesh=self.mesh, monitor=MONITOR,
                            progress=c.progress, writer=writer,
                            learning_rate=c.learning_rates[phase], patience=c.patience)
        finally:
            writer.close()

    def identity(self, phase: str) -> dict:
        """What a checkpoint of `phase` must match to be resumed: the run, freezing rules, seed."""
        return {"run_sha256": self.run_sha256, "seed": self.config.seed,
                "freeze_spec": [list(r) for r in freezing.resolve(PHASE_FREEZING[phase])]}

    def finish(self, phase: str, state, history: list, eval_step, test_split, model: Classifier,
               variables: Callable[[Any], Mapping]) -> dict:
        """Test accuracy, history.json, results.json, curves.png and classifiers/<phase> (the classifier
        `model` with `variables(state)`) of the epoch `Config.evaluate` picks (best: restored
        from its checkpoint; last: `state`); a phase already finished and reported the same way
        (same history, export present) is not redone."""
        classifier_dir = self.workdir / CLASSIFIERS / phase
        done = _read_json(self.workdir / report.RESULTS).get(phase)
        if (done and done.get("evaluate") == self.config.evaluate
                and _read_json(self.workdir / report.HISTORY).get(phase) == history
                and (classifier_dir / CLASSIFIER).is_file()):
            logger.info(f"phase {phase}: already reported (test accuracy {done['test_accuracy']:.4f})")
            return done
        state, epoch = self.tested(phase, state, history)
        test = loop.evaluate(state, eval_step, test_split, self.mesh, progress=self.config.progress,
                             desc=f"phase {phase}: test")
        result = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                  "test_examples": test["count"], "epochs": len(history),
                  "evaluate": self.config.evaluate, "tested_epoch": epoch,
                  "final_val_accuracy": history[-1]["val_accuracy"] if history else None,
                  "best_val_accuracy": max((r["val_accuracy"] for r in history), default=None),
                  "image_size": self.config.image_size, "preprocessing": self.mode,
                  "run_sha256": self.run_sha256}
        logger.info(f"phase {phase}: test accuracy {test['accuracy']:.4f} ({test['count']} images), "
                    f"test loss {test['loss']:.4f}, " + (f"epoch {epoch}'s parameters ({self.config.evaluate})"
                                                         if epoch else "the initial parameters"))
        if jax.process_index() != 0:  # every process evaluates (a collective); one writes
            return result
        histories = report.update_json(self.workdir / report.HISTORY, phase, history)
        report.update_json(self.workdir / report.RESULTS, phase, result)
        if any(histories.values()):  # --epochs 0 trains nothing: no curves to draw
            report.plot_curves({p: histories[p] for p in PHASES if p in histories},
                               self.workdir / report.CURVES, notes=self.notes())
        classifier = TrainedClassifier(
            model=model, variables=dict(variables(state)), preprocessing=self.mode,
            image_size=self.config.image_size, class_names=self.splits["train"].class_names)
        save(classifier_dir, classifier, self.weights.meta, info={"phase": phase, **result},
               overwrite=True)
        return result

    def tested(self, phase: str, state, history: list) -> tuple[Any, int | None]:
        """(state, epoch) to test: the best epoch's, restored from its checkpoint, or the last
        (`Config.evaluate`); epoch None when no epoch was trained."""
        if not history:
            return state, None
        if self.config.evaluate == "last":
            return state, history[-1]["epoch"]
        best, meta = loop.restore_checkpoint(state, self.workdir / "checkpoints", phase, "best", MONITOR)
        return best, meta["epoch"]

    def notes(self) -> list[str]:
        """What the figure must say about its inputs: random weights, generated data."""
        return synthetic.notes(self.config.data, self.weights.meta)


def run(config: Config, restart: bool = False) -> dict:
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
        splits.check_image_folder(config.data)
    start = None
    if (Path(config.weights) / CLASSIFIER).is_file():  # a classifier: finetune continues from it
        start = load_classifier(config.weights)
        weights = store.load(Path(config.weights) / start.meta["base"])
    else:
        weights = store.load(config.weights)
    mode = config.preprocess or weights.meta["preprocessing"]
    sha = weights.meta.get("variables_sha256") or digest(weights.variables)
    if start is not None:
        _check_start(config, start, mode)
        sha += "+head:" + digest(start.variables["params"]["head"])
    identity = run_identity(config, weights.meta, sha, mode)
    workdir = Path(config.workdir).absolute()
    make_workdir(workdir)
    # One run at a time in a workdir (process 0 of a multi-host job stands for the job).
    lock = (locks.locked(workdir, f"--workdir {workdir}") if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        claim_workdir(workdir, identity, restart)
        return _run(config, weights, mode, identity, workdir, start)


def _check_start(config: Config, start: TrainedClassifier, mode: str) -> None:
    """A classifier given as --weights must fit the run: its image size, its preprocessing, and
    only `finetune` (and `features`) start from it, since `frozen` trains a fresh head."""
    problems = []
    if start.image_size != config.image_size:
        problems.append(f"it takes {start.image_size}x{start.image_size} images: add --image-size "
                        f"{start.image_size}")
    if mode != start.preprocessing:
        problems.append(f"it was trained with --preprocess {start.preprocessing}, not {mode}")
    if "frozen" in config.phases:
        problems.append("--phases frozen would train a fresh head; use --phases finetune")
    if problems:
        raise ValueError(f"--weights {config.weights} is a classifier: " + "; ".join(problems))


def _run(config: Config, weights: store.Pretrained, mode: str, identity: Mapping, workdir: Path,
         start: TrainedClassifier | None = None) -> dict:
    """`run` after the checks, in the claimed and locked workdir."""
    n_proc = jax.process_count()
    if jax.process_index() == 0:
        with atomic.writing(workdir / "config.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n")
    base_model, base_variables = conv_base(weights, config.conv_impl)

    # One input pipeline per process, each reading its rows of every global batch.
    loaded = {name: split.shard(jax.process_index(), n_proc) for name, split in splits.load_book_splits(
        config.data, config.image_size, config.batch_size, pipeline=config.pipeline,
        seed=config.seed, tfds_data_dir=config.tfds_data_dir).items()}
    mesh = parallel.make_mesh() if config.data_parallel else None
    logger.info(f"data {config.data}: " + ", ".join(f"{n} {s.num_examples}" for n, s in loaded.items())
        + f" images at {config.image_size}x{config.image_size}, classes {list(loaded['train'].class_names)}; "
        f"weights {config.weights} ({weights.meta['arch']}), preprocessing {mode!r}"
        + (f"; batches split over {mesh.size} devices" if mesh else ""))
    run_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    r = _Run(config, weights, base_model, base_variables, mode, loaded, mesh, run_sha256)

    phases = config.phases if start is not None else config.phases_to_run
    if "frozen" in phases and "frozen" not in config.phases:
        logger.info("phase finetune continues from phase frozen: running (or restoring) it first")
    results = {}
    if "features" in phases:
        results["features"] = features_phase(r)
    if "frozen" in phases:
        results["frozen"], frozen = frozen_phase(r)
    elif "finetune" in phases:
        logger.info(f"phase finetune continues from the classifier {config.weights}")
        frozen = _from_classifier(r, start)
    if "finetune" in phases:
        results["finetune"] = finetune_phase(r, *frozen)
    return results


def features_phase(r: _Run) -> dict:
    """Feature extraction: conv features computed once (cached), a fresh head trained on them."""
    base = with_compute_dtype(r.base_model, r.config.compute_dtype)
    feats = feature_cache.extract(base, r.base_variables, r.splits, r.workdir / "features_cache",
                             preprocess_mode=r.mode, weights_meta=r.weights.meta,
                             progress=r.config.progress)
    head = r.head()
    state, tx = r.start("features", head.init(r.key("features"), np.asarray(feats["train"].features[:1])))
    train_step = steps.make_train_step(head, tx, input_key="features", mesh=r.mesh,
                                          compute_dtype=r.config.compute_dtype)
    eval_step = steps.make_eval_step(head, input_key="features", mesh=r.mesh,
                                        compute_dtype=r.config.compute_dtype)
    state, history = r.fit("features", state, train_step, eval_step, feats["train"], feats["validation"])

    def variables(state):  # the original base under the trained head: the same predictions, from images
        tree = {k: {"base": v} for k, v in r.base_variables.items()}
        tree["params"]["head"] = state.params
        return tree

    return r.finish("features", state, history, eval_step, feats["test"],
                    Classifier(base=r.base_model, head=head), variables)


def frozen_phase(r: _Run):
    """Frozen conv base, fresh head, on-device augmentation. Returns (results, (model, state,
    eval_step)), what `finetune_phase` continues from."""
    model, variables = init_classifier(r.base_variables, r.base_model, r.head(), r.config.image_size,
                                       r.key("frozen"))
    state, tx = r.start("frozen", variables)
    train_step = steps.make_train_step(model, tx, augment=r.config.augment, preprocess_mode=r.mode,
                                          mesh=r.mesh, compute_dtype=r.config.compute_dtype)
    eval_step = steps.make_eval_step(model, preprocess_mode=r.mode, mesh=r.mesh,
                                        compute_dtype=r.config.compute_dtype)
    state, history = r.fit("frozen", state, train_step, eval_step, r.splits["train"], r.splits["validation"])
    results = r.finish("frozen", state, history, eval_step, r.splits["test"], model, steps.TrainState.variables)
    return results, (model, state, eval_step)


def _from_classifier(r: _Run, start: TrainedClassifier):
    """(model, state, eval_step) as `frozen_phase` gives them, from a classifier given as --weights
    (the base rebuilt with the run's conv_impl). Its classes must be the data's, in order."""
    names = tuple(r.splits["train"].class_names)
    if tuple(start.class_names) != names:
        raise ValueError(f"--weights {r.config.weights} classifies {list(start.class_names)}, the "
                         f"data's classes are {list(names)}: import it again with `{download.CONVERT_COMMAND} "
                         f"--class-names {','.join(names)}` if they are the same classes")
    model = Classifier(base=r.base_model, head=start.model.head)
    state = steps.TrainState.create(start.variables, optax.identity(), r.config.seed)
    eval_step = steps.make_eval_step(model, preprocess_mode=r.mode, mesh=r.mesh,
                                    compute_dtype=r.config.compute_dtype)
    return model, state, eval_step


def finetune_phase(r: _Run, model: Classifier, frozen_state, eval_step) -> dict:
    """Unfreeze block5 from the frozen phase's final parameters (where it stopped, whichever
    epoch it tested): new optimizer, new train step."""
    state, tx = r.start("finetune", frozen_state.variables())
    train_step = steps.make_train_step(model, tx, augment=r.config.augment, preprocess_mode=r.mode,
                                          mesh=r.mesh, compute_dtype=r.config.compute_dtype)
    # Same model and inputs as the frozen phase: its compiled eval step is reused.
    state, history = r.fit("finetune", state, train_step, eval_step, r.splits["train"],
                           r.splits["validation"])
    return r.finish("finetune", state, history, eval_step, r.splits["test"], model, steps.TrainState.variables)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
