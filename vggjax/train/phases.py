"""The book's three phases (`features`, `frozen`, `finetune`; see `vggjax.train.workflow`) and the
`Run` they share: its config, weights, splits and the outputs each phase writes."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from vggjax.inference.classifier import CLASSIFIER, TrainedClassifier, save
from vggjax.inference.heads import Classifier, Head, init_classifier
from vggjax.model.compute_dtype import with_compute_dtype
from vggjax.train import feature_cache, freezing, loop, metric_writers, parallel, report, steps, synthetic
from vggjax.train.config import PHASE_FREEZING, PHASES, Config
from vggjax.train.run_identity import CLASSIFIERS
from vggjax.weights import download, store

logger = logging.getLogger(__name__)
MONITOR = "val_loss"  # the best epoch's metric, as the book's ModelCheckpoint


@dataclasses.dataclass
class Run:
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


def features_phase(r: Run) -> dict:
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


def frozen_phase(r: Run):
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


def from_classifier(r: Run, start: TrainedClassifier):
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


def finetune_phase(r: Run, model: Classifier, frozen_state, eval_step) -> dict:
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
