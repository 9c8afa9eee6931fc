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

The phases themselves live in `vggjax.train.phases`, the settings and their flags in
`vggjax.train.config`, the inputs' checks in
`vggjax.train.inputs`, the run's identity and workdir ownership in `vggjax.train.run_identity`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Mapping

import jax

from vggjax.inference.classifier import CLASSIFIER, TrainedClassifier, load_classifier
from vggjax.train import parallel, phases, splits
from vggjax.train.config import Config
from vggjax.train.inputs import conv_base
from vggjax.train.run_identity import claim_workdir, make_workdir, run_identity
from vggjax.utils import atomic, locks
from vggjax.utils.trees import digest
from vggjax.weights import store

logger = logging.getLogger(__name__)


def run(config: Config, restart: bool = False) -> dict:
    """Run `config.phases` (plus `frozen` when `finetune` needs it) in the book's order.

    Before any work: the data folder is checked (`splits.check_image_folder`), the weights loaded
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
        seed=config.seed, tfds_data_dir=config.tfds_data_dir, check=False).items()}  # `run` checked it
    mesh = parallel.make_mesh() if config.data_parallel else None
    logger.info(f"data {config.data}: " + ", ".join(f"{n} {s.num_examples}" for n, s in loaded.items())
        + f" images at {config.image_size}x{config.image_size}, classes {list(loaded['train'].class_names)}; "
        f"weights {config.weights} ({weights.meta['arch']}), preprocessing {mode!r}"
        + (f"; batches split over {mesh.size} devices" if mesh else ""))
    run_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    r = phases.Run(config, weights, base_model, base_variables, mode, loaded, mesh, run_sha256)

    to_run = config.phases if start is not None else config.phases_to_run
    if "frozen" in to_run and "frozen" not in config.phases:
        logger.info("phase finetune continues from phase frozen: running (or restoring) it first")
    results = {}
    if "features" in to_run:
        results["features"] = phases.features_phase(r)
    if "frozen" in to_run:
        results["frozen"], frozen = phases.frozen_phase(r)
    elif "finetune" in to_run:
        logger.info(f"phase finetune continues from the classifier {config.weights}")
        frozen = phases.from_classifier(r, start)
    if "finetune" in to_run:
        results["finetune"] = phases.finetune_phase(r, *frozen)
    return results
