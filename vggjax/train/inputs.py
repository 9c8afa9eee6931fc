"""The workflow's inputs: the weights (converted, or the Keras download) and the image data, found or refused in one line."""
from __future__ import annotations

import logging
from pathlib import Path

from vggjax.inference.classifier import CLASSIFIER
from vggjax.model.vgg import create, without_top
from vggjax.weights import download, store
from vggjax.train.splits import BOOK_SPLITS, SPLITS

logger = logging.getLogger(__name__)
_KERAS_NOTOP = download.official_file("keras", "vgg16", include_top=False)

class MissingInputError(RuntimeError):
    """The weights or the images a run needs are not on this machine and cannot be fetched."""


def resolve_weights(weights: str | None) -> str:
    """The weights directory a run uses: `weights` when given (it must exist), else the cached
    conversion of Keras' VGG16 no-top file, downloaded (checksum-verified) and converted on first
    use. Raises MissingInputError saying what to provide when that is impossible (offline)."""
    how = ("provide converted weights with --weights DIR, made from Keras' "
           f"{_KERAS_NOTOP.filename} ({_KERAS_NOTOP.url}) by\n"
           f"  {download.CONVERT_COMMAND} --source keras --arch vgg16 "
           f"--input {_KERAS_NOTOP.filename} --output DIR")
    if weights is not None:
        if not any((Path(weights) / name).is_file() for name in (store.METADATA, CLASSIFIER)):
            raise MissingInputError(f"--weights {weights} is neither a converted weights directory "
                                    f"nor a classifier (no {store.METADATA} or {CLASSIFIER} in it); {how}")
        return str(weights)
    default = store.default_output_dir("keras", "vgg16", include_top=False)
    if not (default / store.METADATA).is_file():
        logger.info(f"weights: converting Keras VGG16 (no top) into {default}")
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
           f"(the book: {', '.join(f'{n}+{n}' for n in BOOK_SPLITS.values())} images)")
    if data != "tfds":
        missing = [s for s in SPLITS if not (Path(data) / s).is_dir()]
        if missing:
            raise MissingInputError(f"--data {data} lacks the folder(s) {missing}; {how}")


def resolve_inputs(weights: str | None, data: str) -> str:
    """`resolve_weights` and `check_data` together: the weights directory to use, or one
    MissingInputError naming everything that is missing and how to provide it."""
    problems = []
    try:
        weights = resolve_weights(weights)
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
