"""The raw corpus as the readers return it: per split, texts, labels and where each row came from; and its fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class RawSplit:
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)

    def add(self, text: str, label: int, origin: str) -> None:
        self.texts.append(text)
        self.labels.append(label)
        self.origins.append(origin)

    def __len__(self) -> int:
        return len(self.texts)


RawCorpus = dict[str, RawSplit]


@dataclass(frozen=True)
class SourceInfo:
    """What was read: recorded in the manifest so a dataset can be traced back."""

    kind: str  # url | tarball | folder | parquet | sample
    location: str
    fingerprint: str  # sha256 over every (split, label, text) read, in a fixed order


def fingerprint(corpus: RawCorpus) -> str:
    digest = hashlib.sha256()
    for split in sorted(corpus):
        rows = sorted(zip(corpus[split].labels, corpus[split].texts))
        for label, text in rows:
            digest.update(f"{split}\x1f{label}\x1f{text}\x1e".encode("utf-8"))
    return digest.hexdigest()
