"""Deterministic, stratified splits decided by a hash of each text.

A random state depends on the row order and the library version; a hash of the
text does not, so the same review lands in the same split on every machine and
every run, and adding reviews never moves old ones across splits... except at the
boundary of the per-label quota, which is the price of exact stratification.
"""

from __future__ import annotations

import hashlib

from pipelines.data.corpus import RawSplit


def text_key(text: str, salt: str = "") -> bytes:
    return hashlib.sha256((salt + text).encode("utf-8")).digest()


def hash_order(split: RawSplit, salt: str = "order") -> RawSplit:
    """Rows in a pseudo-random order fixed by their text.

    The source lists all negative then all positive reviews; written in that order,
    each shard would hold one label and streaming would feed the model runs of
    one class. A hash order mixes every shard.
    """
    order = sorted(range(len(split)), key=lambda i: text_key(split.texts[i], salt))
    return _take(split, order)


def _take(split: RawSplit, indices: list[int]) -> RawSplit:
    taken = RawSplit()
    for i in indices:
        taken.add(split.texts[i], split.labels[i], split.origins[i])
    return taken


def stratified_split(split: RawSplit, fraction: float, salt: str = "val") -> tuple[RawSplit, RawSplit]:
    """(rest, carved): `fraction` of each label, chosen by hash, goes to `carved`."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    carved_indices: list[int] = []
    rest_indices: list[int] = []
    for label in sorted(set(split.labels)):
        members = [i for i, lab in enumerate(split.labels) if lab == label]
        members.sort(key=lambda i: text_key(split.texts[i], salt))
        quota = round(len(members) * fraction)
        carved_indices.extend(members[:quota])
        rest_indices.extend(members[quota:])
    return _take(split, sorted(rest_indices)), _take(split, sorted(carved_indices))
