"""Tests for pipelines.text.tokenization without Ray: the UDF classes are called directly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.core.errors import ConfigError
from pipelines.text.tokenization import (
    PadCollate,
    RustTokenizer,
    TokenizeBatch,
    TokenizerSettings,
    load_tokenizer,
    pad_batch,
    rust_tokenizer_agrees,
    special_token_frame,
    tokenize_batch,
    truncate,
)

pytestmark = pytest.mark.timeout(60)

CLS, SEP, PAD = 101, 102, 0
LONG_REVIEW = " ".join(f"opening{i % 7} plot" for i in range(150)) + " overall a dreadful waste"


@pytest.fixture(scope="module")
def head_tail(bundled_model_path: str) -> TokenizeBatch:
    return TokenizeBatch({"model_name_or_path": bundled_model_path, "max_length": 32, "truncation": "head_tail"})


@pytest.fixture(scope="module")
def head_only(bundled_model_path: str) -> TokenizeBatch:
    return TokenizeBatch({"model_name_or_path": bundled_model_path, "max_length": 32, "truncation": "head"})


def batch_of(*texts: str) -> dict[str, np.ndarray]:
    return {"text": np.array(texts, dtype=object), "label": np.arange(len(texts)) % 2}


# ---------------------------------------------------------------- truncate


def test_truncate_head() -> None:
    ids = list(range(100))
    assert truncate(ids, 10, "head") == list(range(10))


def test_truncate_head_tail_keeps_a_quarter_head_and_the_rest_tail() -> None:
    ids = list(range(1000))
    out = truncate(ids, 510, "head_tail")
    head = int(510 * 0.25)  # 127
    assert len(out) == 510
    assert out[:head] == list(range(head))
    assert out[head:] == list(range(1000 - (510 - head), 1000))
    assert truncate(list(range(50)), 10, "head_tail") == [0, 1] + list(range(42, 50))


@pytest.mark.parametrize("mode", ["head", "head_tail"])
def test_truncate_leaves_short_input_alone(mode: str) -> None:
    ids = [5, 6, 7]
    assert truncate(ids, 3, mode) == [5, 6, 7]
    assert truncate(ids, 10, mode) == [5, 6, 7]
    assert truncate([], 10, mode) == []


def test_truncate_head_tail_tiny_budget_keeps_one_head_token() -> None:
    assert truncate(list(range(20)), 3, "head_tail") == [0, 18, 19]


# ---------------------------------------------------------------- TokenizeBatch


def test_special_token_frame_of_bert(head_tail: TokenizeBatch) -> None:
    assert special_token_frame(head_tail.tokenizer) == ([CLS], [SEP])
    assert head_tail.budget == 30


def test_tokenize_batch_frames_and_bounds_rows(head_tail: TokenizeBatch) -> None:
    out = head_tail(batch_of("A great film.", LONG_REVIEW, "Bad."))
    assert set(out) == {"input_ids", "length", "label"}
    assert len(out["input_ids"]) == 3
    for row, length in zip(out["input_ids"], out["length"]):
        assert row.dtype == np.int32
        assert row[0] == CLS and row[-1] == SEP
        assert len(row) == length <= 32
        assert SEP not in row[1:-1] and CLS not in row[1:]
    assert out["length"][1] == 32  # the long review fills the budget
    assert out["length"][0] < 10  # a short review is not padded
    assert out["label"].tolist() == [0, 1, 0]
    assert out["label"].dtype == np.int64
    # the short review is tokenized faithfully
    assert head_tail.tokenizer.decode(out["input_ids"][0][1:-1].tolist()) == "a great film."


def test_head_tail_keeps_the_ending_head_drops_it(head_tail: TokenizeBatch, head_only: TokenizeBatch) -> None:
    tail_row = head_tail(batch_of(LONG_REVIEW))["input_ids"][0]
    head_row = head_only(batch_of(LONG_REVIEW))["input_ids"][0]
    assert len(tail_row) == len(head_row) == 32
    tail_text = head_tail.tokenizer.decode(tail_row[1:-1].tolist())
    head_text = head_only.tokenizer.decode(head_row[1:-1].tolist())
    assert tail_text.split()[-1] == "waste"
    assert tail_text.split()[-3:] == ["a", "dreadful", "waste"]
    assert tail_text.startswith("opening0 plot")
    assert "waste" not in head_text and head_text.startswith("opening0 plot")


def test_tokenize_batch_accepts_numpy_strings(head_tail: TokenizeBatch) -> None:
    out = head_tail({"text": np.array(["fine", "poor"]), "label": np.array([1, 0])})
    assert [len(r) for r in out["input_ids"]] == out["length"].tolist()


# ---------------------------------------------------------------- padding


def ragged(*lengths: int) -> np.ndarray:
    rows = np.empty(len(lengths), dtype=object)
    rows[:] = [np.arange(1, n + 1, dtype=np.int32) + 1000 for n in lengths]
    return rows


def test_pad_collate_pads_to_the_longest_row_not_max_length() -> None:
    batch = {"input_ids": ragged(3, 7, 5), "label": np.array([1, 0, 1])}
    out = PadCollate(pad_token_id=PAD)(batch)
    assert out["input_ids"].shape == (3, 7)
    assert out["attention_mask"].shape == (3, 7)
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    assert out["attention_mask"].sum(dim=1).tolist() == [3, 7, 5]
    assert out["input_ids"][0].tolist() == [1001, 1002, 1003, 0, 0, 0, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert out["labels"].tolist() == [1, 0, 1] and out["labels"].dtype == torch.int64


def test_pad_collate_multiple_of_8_rounds_up() -> None:
    out = PadCollate(pad_token_id=7, multiple_of=8)({"input_ids": ragged(3, 9), "label": np.array([0, 1])})
    assert out["input_ids"].shape == (2, 16)
    assert out["attention_mask"].sum(dim=1).tolist() == [3, 9]
    assert out["input_ids"][0, 3:].tolist() == [7] * 13
    ids, mask = pad_batch(ragged(8, 2), pad_token_id=0, multiple_of=8)
    assert ids.shape == mask.shape == (2, 8)  # already a multiple: no extra padding


def test_pad_collate_on_tokenized_rows(head_tail: TokenizeBatch) -> None:
    tokenized = head_tail(batch_of("ok", "A short but sincere review of a film."))
    pad_id = head_tail.tokenizer.pad_token_id
    out = PadCollate(pad_token_id=pad_id)(tokenized)
    assert out["input_ids"].shape[1] == max(tokenized["length"]) < 32
    assert out["attention_mask"].sum(dim=1).tolist() == tokenized["length"].tolist()


# ---------------------------------------------------------------- settings and loading


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"truncation": "tail"}, "--truncation"),
        ({"truncation": ""}, "--truncation"),
        ({"max_length": 4}, "--max-length"),
        ({"max_length": 0}, "--max-length"),
    ],
)
def test_tokenizer_settings_reject_bad_values(options: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        TokenizerSettings(model_name_or_path="x", **options)


def test_tokenizer_settings_defaults() -> None:
    settings = TokenizerSettings(model_name_or_path="m")
    assert settings.as_dict() == {"model_name_or_path": "m", "max_length": 256, "truncation": "head_tail"}


def test_load_tokenizer_on_a_non_model_folder_names_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("nothing to see")
    with pytest.raises(ConfigError) as info:
        load_tokenizer(str(folder))
    assert str(folder) in str(info.value)
    assert "--model" in str(info.value)


def test_tokenize_batch_with_bad_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        TokenizeBatch({"model_name_or_path": str(tmp_path), "max_length": 32})


# ---------------------------------------------------------------- the Rust tokenizer of the data workers


@pytest.fixture(scope="module")
def both_tokenizers(bundled_model_path: str):
    return load_tokenizer(bundled_model_path), RustTokenizer(Path(bundled_model_path) / "tokenizer.json")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_the_rust_tokenizer_gives_autotokenizers_ids(both_tokenizers, texts: list[str]) -> None:
    """Any unicode, control characters included: training's ids are Serve's ids."""
    reference, rust = both_tokenizers
    for special in (False, True):
        expected = reference(texts, add_special_tokens=special, truncation=False, verbose=False)["input_ids"]
        assert rust(texts, add_special_tokens=special)["input_ids"] == [list(ids) for ids in expected]


def test_the_bundled_and_the_tiny_model_tokenize_without_transformers(bundled_model_path: str, tiny_model_dir: str) -> None:
    assert rust_tokenizer_agrees(bundled_model_path)
    assert rust_tokenizer_agrees(tiny_model_dir)


def test_a_tokenizer_json_that_autotokenizer_overrides_is_not_used_alone(bundled_model_path: str, tmp_path: Path) -> None:
    """transformers rebuilds BERT's [CLS] ... [SEP] template; a tokenizer.json without one disagrees."""
    folder = tmp_path / "model"
    shutil.copytree(bundled_model_path, folder)
    tokenizer_file = folder / "tokenizer.json"
    payload = json.loads(tokenizer_file.read_text())
    payload["post_processor"] = None
    tokenizer_file.write_text(json.dumps(payload))

    assert not rust_tokenizer_agrees(str(folder))
    settings = TokenizerSettings(str(folder), 32).as_dict()
    rows = tokenize_batch(batch_of("hi there"), settings, rust=rust_tokenizer_agrees(str(folder)))["input_ids"]
    assert rows[0][0] == CLS and rows[0][-1] == SEP


def test_a_model_without_tokenizer_json_keeps_autotokenizer(tmp_path: Path) -> None:
    assert not rust_tokenizer_agrees(str(tmp_path))


def test_a_data_worker_tokenizes_without_importing_torch_or_transformers(bundled_model_path: str) -> None:
    """What a fresh Ray Data worker does for a split: seconds of imports saved per worker."""
    program = f"""
import sys
import numpy as np
from pipelines.text.tokenization import TokenizerSettings, tokenize_batch
batch = {{"text": np.array(["A moving story."], dtype=object), "label": np.array([1])}}
rows = tokenize_batch(batch, TokenizerSettings({bundled_model_path!r}, 32).as_dict(), rust=True)["input_ids"]
print(rows[0].tolist(), sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    ids, imported = result.stdout.strip().rsplit(" [", 1)
    assert ids.startswith(f"[{CLS}, ") and ids.endswith(f", {SEP}]")
    assert imported == "]", f"imported: [{imported}"
