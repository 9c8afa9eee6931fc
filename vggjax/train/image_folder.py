"""The book's image folder, DIR/<split>/<class>/<image files>: listed by one walk (`walk_split`,
tfds ImageFolder's rule; `list_folder`: paths and labels), and the files a split leaves out, named
in one `SkippedFilesWarning` (`decodable`). The checks of a whole folder: `splits.check_image_folder`."""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np

# What tfds.folder_dataset.ImageFolder lists (its _SUPPORTED_IMAGE_FORMAT); anything else is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# How many skipped files the warning names before summarising the rest.
_NAMED_IN_WARNING = 20


class SkippedFilesWarning(UserWarning):
    """Some images could not be read or decoded and were left out of a split."""


def decodable(where: str, names: Sequence[str], ok, labels: Sequence[int],
              class_names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(indices of the decodable examples, the names of the others) of a split listed at `where`,
    `ok` a bool per name, `labels` its class index. The others are named in one
    SkippedFilesWarning; ValueError when no example is decodable, or none of a class (a
    "2-class" model would learn one class)."""
    ok = np.asarray(ok, bool)
    skipped = tuple(n for n, good in zip(names, ok) if not good)
    if not ok.any():
        raise ValueError(f"{where}: none of its {len(names)} files could be decoded as an image")
    labels = np.asarray(labels)
    for k, name in enumerate(class_names):
        if (labels == k).any() and not ok[labels == k].any():
            lost = [n for n, label in zip(names, labels) if label == k]
            raise ValueError(f"{where}: class {name!r} has no image that can be decoded (skipped "
                             f"{named(lost)}): fix or remove those files, or that class")
    if skipped:
        warnings.warn(f"{where}: skipped {len(skipped)} of {len(names)} files that could not be "
                      f"read or decoded as images: {named(skipped)}", SkippedFilesWarning, stacklevel=3)
    return np.flatnonzero(ok), skipped


def named(paths) -> str:
    """The first paths of a warning, then how many more."""
    more = len(paths) - _NAMED_IN_WARNING
    return ", ".join(paths[:_NAMED_IN_WARNING]) + (f" and {more} more" if more > 0 else "")


def walk_split(root: str, split: str) -> tuple[str, dict[str, list[str]], list[str]]:
    """(split folder, {class: its image paths}, the other entries' paths) of root/split: the one
    listing of the book's layout, by ImageFolder's rule. Classes are the sub-folders, images the
    entries whose name ends in IMAGE_EXTENSIONS (any case), both sorted; hidden entries count like
    any other, as ImageFolder lists them. ValueError naming the folder when it is missing or
    holds no class folder."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise ValueError(f"{split_dir}: no such folder (expected {root}/<split>/<class>/*.jpg)")
    classes, others = {}, []
    for entry in sorted(os.listdir(split_dir)):
        class_dir = os.path.join(split_dir, entry)
        if not os.path.isdir(class_dir):
            others.append(class_dir)
            continue
        classes[entry] = []
        for name in sorted(os.listdir(class_dir)):
            path = os.path.join(class_dir, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                classes[entry].append(path)
            else:
                others.append(path)
    if not classes:
        raise ValueError(f"{split_dir} is empty: expected one folder of images per class")
    return split_dir, classes, others


def list_folder(root: str, split: str) -> tuple[list[str], list[str], list[int]]:
    """(class_names, paths, labels) of root/split as `walk_split` lists it: the paths class by
    class, each labelled with its class's index. ValueError as `walk_split`."""
    _, classes, _ = walk_split(root, split)
    paths, labels = [], []
    for label, images in enumerate(classes.values()):
        paths += images
        labels += [label] * len(images)
    return list(classes), paths, labels
