"""Tests for the synthetic aclImdb corpus: layout, determinism, realism and signal."""

from __future__ import annotations

import pathlib
import random
import re
import statistics

import pytest

from pipelines.data.sample_corpus import SAMPLE_TEST_PER_LABEL, SAMPLE_TRAIN_PER_LABEL, generate_reviews, write_sample_corpus

FILE_NAME = re.compile(r"^(\d+)_(\d+)\.txt$")

# Independent of the generator's word lists on purpose: a reviewer's everyday vocabulary.
POSITIVE_WORDS = frozenset(
    "great excellent wonderful best loved brilliant amazing perfect beautiful superb "
    "enjoyed fantastic masterpiece favorite recommend moving outstanding fun good touching".split()
)
NEGATIVE_WORDS = frozenset(
    "bad worst boring awful terrible waste poor dull stupid horrible mess disappointing "
    "annoying lame pointless weak ridiculous predictable avoid wooden".split()
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The default-sized corpus, written once for the module."""
    return write_sample_corpus(tmp_path_factory.mktemp("sample"))


def read_split(root: pathlib.Path, split: str) -> list[tuple[str, int, int, str]]:
    """(text, label, rating, file name) for every review in one split."""
    out = []
    for label_dir, label in (("pos", 1), ("neg", 0)):
        for path in sorted((root / split / label_dir).iterdir()):
            match = FILE_NAME.match(path.name)
            assert match, f"unexpected file name {path}"
            out.append((path.read_text(encoding="utf-8"), label, int(match.group(2)), path.name))
    return out


def tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.replace("<br />", " ").lower())


def lexicon_predict(text: str) -> int:
    tokens = words(text)
    score = sum(t in POSITIVE_WORDS for t in tokens) - sum(t in NEGATIVE_WORDS for t in tokens)
    return int(score > 0)


@pytest.mark.timeout(60)
def test_layout_and_counts(corpus: pathlib.Path) -> None:
    assert corpus.name == "aclImdb"
    readme = (corpus / "README").read_text(encoding="utf-8")
    assert "synthetic" in readme.lower() and "means nothing" in readme
    expected = {"train": SAMPLE_TRAIN_PER_LABEL, "test": SAMPLE_TEST_PER_LABEL}
    for split, n in expected.items():
        for label_dir in ("pos", "neg"):
            names = [p.name for p in (corpus / split / label_dir).iterdir()]
            assert len(names) == n, (split, label_dir)
            ids = sorted(int(FILE_NAME.match(name).group(1)) for name in names)
            assert ids == list(range(n)), "ids must be 0..n-1 per folder, like aclImdb"
    assert sorted(p.name for p in corpus.iterdir()) == ["README", "test", "train"]


@pytest.mark.timeout(60)
def test_ratings_in_label_ranges_and_no_empty_files(corpus: pathlib.Path) -> None:
    for split in ("train", "test"):
        reviews = read_split(corpus, split)
        for text, label, rating, name in reviews:
            assert text.strip(), f"{split}/{name} is empty"
            assert (7 <= rating <= 10) if label else (1 <= rating <= 4), (split, name)
        # Every rating value occurs, as in the real data.
        assert {r for _, _, r, _ in reviews} == {1, 2, 3, 4, 7, 8, 9, 10}


@pytest.mark.timeout(60)
def test_same_seed_is_byte_identical_and_other_seed_differs(corpus: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = write_sample_corpus(tmp_path / "again")
    assert tree_bytes(again) == tree_bytes(corpus)

    small_a = tree_bytes(write_sample_corpus(tmp_path / "a", train_per_label=30, test_per_label=20, seed=1))
    small_b = tree_bytes(write_sample_corpus(tmp_path / "b", train_per_label=30, test_per_label=20, seed=2))
    assert small_a != small_b
    shared = [k for k in small_a if k.endswith(".txt") and small_a[k] == small_b.get(k)]
    assert len(shared) < 5, "different seeds should give mostly different reviews"


@pytest.mark.timeout(60)
def test_generation_leaves_global_random_state_alone() -> None:
    random.seed(123)
    state = random.getstate()
    first = generate_reviews(20, seed=5, split="test")
    assert random.getstate() == state
    random.seed(999)  # changing global state must not change the output
    assert generate_reviews(20, seed=5, split="test") == first


@pytest.mark.timeout(60)
def test_generate_reviews_is_balanced_and_splits_differ() -> None:
    train = generate_reviews(50, seed=0, split="train")
    test = generate_reviews(50, seed=0, split="test")
    for reviews in (train, test):
        assert [label for _, label, _ in reviews].count(1) == 50
        assert [label for _, label, _ in reviews].count(0) == 50
    shared = {t for t, _, _ in train} & {t for t, _, _ in test}
    assert 1 <= len(shared) <= 5, "splits overlap only by the few reposted reviews"


@pytest.mark.timeout(60)
def test_length_distribution_is_imdb_like(corpus: pathlib.Path) -> None:
    lengths = [len(text.split()) for split in ("train", "test") for text, *_ in read_split(corpus, split)]
    assert 80 <= statistics.median(lengths) <= 300
    assert sum(n > 600 for n in lengths) >= 10, "a tail of long reviews"
    assert sum(n > 1000 for n in lengths) >= 3, "a few very long reviews"
    assert sum(n < 30 for n in lengths) >= 5, "a few one- or two-sentence reviews"
    assert sum(80 <= n <= 300 for n in lengths) / len(lengths) > 0.6, "most reviews 80-300 words"


@pytest.mark.timeout(60)
def test_long_reviews_state_opinion_at_both_ends(corpus: pathlib.Path) -> None:
    long_reviews = [r for r in read_split(corpus, "train") if len(r[0].split()) > 600]
    assert long_reviews
    for text, *_ in long_reviews:
        tokens = words(text)
        head, tail = tokens[:60], tokens[-60:]
        assert any(t in POSITIVE_WORDS | NEGATIVE_WORDS for t in head + tail)
    # The middle is mostly neutral plot: far fewer sentiment words per token than the ends.
    ends = middle = ends_len = middle_len = 0
    for text, *_ in long_reviews:
        tokens = words(text)
        third = len(tokens) // 3
        mid = tokens[third + third // 2 : 2 * third - third // 2]
        edge = tokens[:third // 4] + tokens[-(third // 4):]
        middle += sum(t in POSITIVE_WORDS | NEGATIVE_WORDS for t in mid)
        ends += sum(t in POSITIVE_WORDS | NEGATIVE_WORDS for t in edge)
        middle_len, ends_len = middle_len + len(mid), ends_len + len(edge)
    assert middle / middle_len < 0.5 * ends / ends_len


@pytest.mark.timeout(60)
def test_contains_real_data_quirks(corpus: pathlib.Path) -> None:
    texts = [text for text, *_ in read_split(corpus, "train")]
    with_breaks = sum("<br /><br />" in t for t in texts) / len(texts)
    assert 0.3 <= with_breaks <= 0.7, "about half the reviews have HTML line breaks"
    assert any("<i>" in t and "</i>" in t for t in texts)
    assert any("&amp;" in t for t in texts)
    assert any("  " in t for t in texts), "double spaces"
    non_ascii = "".join(sorted({c for t in texts for c in t if ord(c) > 127}))
    for char in "é’“”—":
        assert char in non_ascii, f"missing {char!r}"
    assert not any(t.endswith("\n") or "\r" in t for t in texts)


@pytest.mark.timeout(60)
def test_duplicates_within_train_and_overlap_with_test(corpus: pathlib.Path) -> None:
    train = [text for text, *_ in read_split(corpus, "train")]
    test = [text for text, *_ in read_split(corpus, "test")]
    duplicates = len(train) - len(set(train))
    assert 0.005 * len(train) <= duplicates <= 0.03 * len(train), duplicates
    overlap = sum(t in set(train) for t in test)
    assert 0.002 * len(test) <= overlap <= 0.02 * len(test), overlap


@pytest.mark.timeout(60)
def test_sentiment_signal_is_real_but_imperfect(corpus: pathlib.Path) -> None:
    test = read_split(corpus, "test")
    accuracy = sum(lexicon_predict(text) == label for text, label, *_ in test) / len(test)
    assert 0.6 <= accuracy <= 0.95, accuracy
    # Label noise: some reviews' wording clearly leans against their label.
    leaning_wrong = sum(
        (lexicon_predict(text) != label) and len(words(text)) > 80 for text, label, *_ in test
    )
    assert leaning_wrong >= 0.03 * len(test)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argument", ["train_per_label", "test_per_label"])
@pytest.mark.parametrize("value", [0, -3])
def test_bad_counts_are_refused(tmp_path: pathlib.Path, argument: str, value: int) -> None:
    with pytest.raises(ValueError, match=argument):
        write_sample_corpus(tmp_path, **{argument: value})
    assert not (tmp_path / "aclImdb").exists()


@pytest.mark.timeout(60)
def test_generate_reviews_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_per_label"):
        generate_reviews(0, seed=0, split="train")
    with pytest.raises(ValueError, match="split"):
        generate_reviews(5, seed=0, split="validation")


@pytest.mark.timeout(60)
def test_rewrite_replaces_synthetic_corpus_but_not_real_data(tmp_path: pathlib.Path) -> None:
    write_sample_corpus(tmp_path, train_per_label=20, test_per_label=10)
    root = write_sample_corpus(tmp_path, train_per_label=5, test_per_label=3)
    assert len(list((root / "train" / "pos").iterdir())) == 5, "stale files from the larger corpus remain"

    real = tmp_path / "real"
    (real / "aclImdb" / "train").mkdir(parents=True)
    (real / "aclImdb" / "README").write_text("Large Movie Review Dataset v1.0", encoding="utf-8")
    with pytest.raises(FileExistsError):
        write_sample_corpus(real, train_per_label=5, test_per_label=3)
    assert (real / "aclImdb" / "README").read_text(encoding="utf-8").startswith("Large Movie")
    assert [p.name for p in real.iterdir()] == ["aclImdb"], "no staging folder left behind"
