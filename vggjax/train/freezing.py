"""Which parameters train: freezing as data (regex rules over '/'-joined paths) and the optimizer it implies."""
from __future__ import annotations

import re
from typing import Mapping, Sequence, Union

import optax

from vggjax.utils.trees import flatten, unflatten

TRAIN, FREEZE = "train", "freeze"
Rules = Sequence[tuple[str, str]]
Spec = Union[str, Rules]

# Paths look like "base/block5_conv1/kernel" for a Classifier and "block5_conv1/kernel" for a bare
# VGG, so the block rules accept both. Every preset ends in a catch-all, so it covers any model.
PRESETS: dict[str, list[tuple[str, str]]] = {
    "head": [(r"head/.*", TRAIN), (r".*", FREEZE)],
    "block5+head": [(r"head/.*", TRAIN), (r"(base/)?block5_.*", TRAIN), (r".*", FREEZE)],
    "block4+block5+head": [(r"head/.*", TRAIN), (r"(base/)?block[45]_.*", TRAIN), (r".*", FREEZE)],
    "all": [(r".*", TRAIN)],
}


def resolve(spec: Spec) -> list[tuple[str, str]]:
    """A preset name or a list of (regex, "train"|"freeze") rules -> the checked list of rules."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown freeze preset {spec!r}; expected one of {sorted(PRESETS)} "
                             "or a list of (regex, 'train'|'freeze') rules")
        return list(PRESETS[spec])
    rules = [tuple(rule) for rule in spec]
    for rule in rules:
        if len(rule) != 2 or rule[1] not in (TRAIN, FREEZE):
            raise ValueError(f"freeze rule {rule!r} is not (regex, 'train'|'freeze')")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"freeze rule {rule!r}: bad regex: {e}") from None
    return rules


def matcher(spec: Spec):
    """path -> "train" | "freeze" | None: the action of the first rule of `spec` whose regex fully
    matches the '/'-joined path (None when none does)."""
    rules = [(re.compile(pattern), action) for pattern, action in resolve(spec)]
    return lambda path: next((a for pattern, a in rules if pattern.fullmatch(path)), None)


def labels(params: Mapping, spec: Spec) -> dict:
    """Pytree like `params` with "train" or "freeze" at each leaf.

    A path gets the action of the first rule whose regex fully matches it (re.fullmatch on the
    '/'-joined path, e.g. "base/block5_conv1/kernel"). ValueError naming the parameters that
    no rule matches.
    """
    action_of = matcher(spec)
    out, unmatched = {}, []
    for path in flatten(params):
        action = action_of(path)
        if action is None:
            unmatched.append(path)
        out[path] = action
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (f", ... ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        raise ValueError(f"no freeze rule matches parameter(s) {shown}; add a rule for them "
                         "(e.g. a final ('.*', 'freeze'))")
    check_selects(f"freeze spec {spec!r}", out, {path for path, a in out.items() if a == TRAIN})
    return unflatten(out)


def check_selects(what: str, paths, trained: set, groups=()) -> None:
    """ValueError (one line, listing the model's groups) when `what` (a spec, in words) trains
    none of `paths`, or names `groups` that none of them is in: a spec meant for another model
    (e.g. "head" on a VGG without one) would otherwise train nothing without a word."""
    present = list(dict.fromkeys(group_name(p) for p in paths))
    if missing := [g for g in groups if g not in present]:
        what = f"{what}: group(s) {missing}"
    elif trained:
        return
    raise ValueError(f"{what} matches no parameter of this model, whose parameters are in "
                     f"{', '.join(present)}; choose from those")


def group_name(path: str) -> str:
    """Report group of a parameter path: "block1".."block5", "head", or its layer name (fc1, ...)."""
    if m := re.search(r"(?:^|/)block(\d+)_", path):
        return f"block{m.group(1)}"
    first, *rest = path.split("/")
    return rest[0] if first == "base" and rest else first


def trainable_report(params: Mapping, param_labels: Mapping) -> str:
    """One log line: trainable / total parameter counts overall and per group (block1..5, head)."""
    sizes = {path: leaf.size for path, leaf in flatten(params).items()}
    label_of = flatten(param_labels)
    groups: dict[str, list[int]] = {}
    for path, size in sizes.items():
        counts = groups.setdefault(group_name(path), [0, 0])
        counts[0] += size if label_of[path] == TRAIN else 0
        counts[1] += size
    total_train = sum(c[0] for c in groups.values())
    total = sum(c[1] for c in groups.values())
    parts = ", ".join(f"{g} {t:,}/{n:,}" for g, (t, n) in groups.items())
    return f"trainable params {total_train:,} of {total:,} ({parts})"


def make_optimizer(tx: optax.GradientTransformation, params: Mapping,
                   spec: Spec) -> optax.GradientTransformation:
    """`tx` for the parameters that `spec` trains; frozen ones get exactly zero updates.

    Built on optax.partition with optax.set_to_zero() for the frozen group, so frozen
    parameters receive no gradient step, no weight decay and carry no optimizer state
    (optax.MaskedNode placeholders, which have no leaves). Inside one jit with the gradient
    computation, XLA also drops the backward pass that only frozen parameters needed.
    """
    return optax.partition({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels(params, spec))


def book_rmsprop(learning_rate: float) -> optax.GradientTransformation:
    """Keras' RMSprop (rho 0.9, epsilon 1e-7), the book's optimizer: 2e-5 for heads, 1e-5 for block5."""
    return optax.rmsprop(learning_rate, decay=0.9, eps=1e-7)

