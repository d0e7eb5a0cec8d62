"""A synthetic, offline stand-in for the IMDB Large Movie Review Dataset.

Why: tests, CI and the no-network default of ``train_imdb`` need IMDB-shaped data
without downloading 80 MB. This module writes a small corpus in the exact aclImdb
layout, so the platform's real ingest and cleaning code reads it unchanged::

    <root>/aclImdb/README
    <root>/aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt

What makes it a useful stand-in rather than a toy:

* a real but imperfect sentiment signal: reviews are assembled from templates with
  neutral plot text, negations ("not bad at all"), mixed opinions, sarcasm, ambiguous
  sentences and ~10% label noise, so simple models score well above chance but not 100%;
* IMDB-like lengths: mostly 80-300 words, a tail of long reviews (a few > 1000 words)
  and a few one-liners;
* the quirks cleaning code must handle: ``<br /><br />``, ``<i>`` markup, ``&amp;``,
  non-ASCII characters (é, curly quotes, em dashes), double spaces, exact duplicates
  within train and a few test reviews that also appear in train.

Everything is derived from ``random.Random(seed + offset)``; no global random state and
no ``hash()``, so the same seed gives byte-identical files on any machine.
Accuracy on this corpus says nothing about a model's quality on real reviews.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import random
import shutil
from collections.abc import Callable, Sequence

SAMPLE_TRAIN_PER_LABEL = 1000
SAMPLE_TEST_PER_LABEL = 500

# Per-split offsets keep train and test independent for one seed. The pool holds the
# reviews that are reposted across splits (the known IMDB train/test overlap).
_SPLIT_OFFSETS = {"train": 0, "test": 1_000_003}
_POOL_OFFSET = 2_000_029

_TRAIN_DUPLICATE_RATE = 0.01  # exact duplicates within train
_OVERLAP_RATE = 0.005  # test reviews that also appear verbatim in train
_NOISE_RATE = 0.10  # reviews whose wording leans against their label

_README = """\
Synthetic movie-review corpus (NOT the IMDB Large Movie Review Dataset)

Generated offline by pipelines/data/sample_corpus.py (seed={seed}) in the same layout as
aclImdb: {{train,test}}/{{pos,neg}}/<id>_<rating>.txt, ratings 7-10 for pos and 1-4 for
neg. Train: {train} reviews per label; test: {test} reviews per label.

The text is built from templates and word lists with deliberate label noise. It exists
to exercise the pipeline end to end without a download. Accuracy on it means nothing
about a model's quality on real reviews.
"""
_README_MARKER = "Synthetic movie-review corpus"

# ---------------------------------------------------------------------------------
# Vocabularies. Plain English; a few entries carry the non-ASCII characters and HTML
# entities that real IMDB text contains.
# ---------------------------------------------------------------------------------

_TITLE_FIRST = [
    "The Last", "Midnight", "Silent", "Broken", "Crimson", "Northern", "Hidden",
    "Lonely", "Electric", "Forgotten", "Burning", "Paper", "Iron", "Golden", "Wild",
    "Distant", "Secret", "Hollow", "Winter", "Desert",
]
_TITLE_SECOND = [
    "Harbor", "Garden", "Highway", "Kingdom", "Letters", "River", "Station", "Summer",
    "Horizon", "Echoes", "Island", "Frontier", "Mirror", "Orchard", "Signal", "Tide",
    "Carnival", "Lighthouse", "Empire", "Café", "Parade", "Witness",
]
_AMP_TITLES = [
    "Love &amp; Thunder", "Salt &amp; Smoke", "Rock &amp; Roll Motel",
    "Guns &amp; Lilies", "Bread &amp; Circuses",
]
_GENRES = [
    "thriller", "comedy", "drama", "horror film", "western", "romance", "war film",
    "musical", "science fiction film", "crime drama", "documentary", "period piece",
    "action movie", "family film", "mystery",
]
_FIRST_NAMES = [
    "John", "Mary", "Robert", "Linda", "James", "Susan", "Michael", "Karen", "David",
    "Helen", "Peter", "Anna", "Thomas", "Grace", "Henry", "Laura", "Frank", "Diane",
    "Oscar", "Ruth", "Walter",
]
# Drawn now and then, so only some reviews contain non-ASCII names.
_ACCENTED_FIRST_NAMES = ["Zoë", "José", "Renée", "Chloé", "Søren"]
_LAST_NAMES = [
    "Walsh", "Harper", "Moreno", "Kowalski", "Bennett", "Fischer", "Okafor", "Reyes",
    "Lindqvist", "Dubois", "Carter", "Nakamura", "Brennan", "Ivanova", "Holt",
    "Marlowe", "Pierce", "Sandoval", "Whitaker", "Crane",
]
_CHARACTERS = [
    "Jack", "Eleanor", "Sam", "Nora", "Eddie", "Clara", "Max", "Lucy", "Vincent",
    "Maggie", "Leo", "Hazel", "Tom", "Iris", "Felix", "Rosa", "Gus", "Vera",
]
_OCCUPATIONS = [
    "retired detective", "young nurse", "struggling painter", "small-town sheriff",
    "factory worker", "schoolteacher", "jazz pianist", "former boxer", "journalist",
    "lawyer", "ship captain", "farmer", "college student", "waitress at a café",
    "mechanic", "night watchman",
]
_PLACES = [
    "a fishing village in Maine", "Chicago", "a mining town in Nevada", "Paris",
    "a small café in Lisbon", "the outskirts of Detroit", "an island off Scotland",
    "1950s Los Angeles", "a boarding school in England", "a ranch in Montana",
    "Berlin after the war", "a space station", "New Orleans", "a quiet suburb",
]
_EVENTS = [
    "a stranger arrives in town", "the family business goes bankrupt",
    "a body is found by the river", "an old letter turns up", "the war breaks out",
    "a storm cuts off the village", "a childhood friend comes back",
    "the money disappears", "a mysterious signal is received", "the factory closes",
]
_GOALS = [
    "find out what really happened", "keep the family together",
    "win back the farm", "clear their name", "get to the border before winter",
    "protect a witness", "finish the last record", "work out whom to trust",
]
_RELATIONS = [
    "an old flame", "a con artist", "a shy neighbor", "a runaway teenager",
    "a corrupt police chief", "a retired singer", "an estranged brother",
    "a talkative cab driver",
]
_ACTIONS = [
    "starts asking questions", "hides something in the attic",
    "makes a deal with the mayor", "leaves town without a word",
    "takes a job at the docks", "writes a letter that is never sent",
    "goes back to the old house", "follows a lead to the city",
]
_YEARS = ["1927", "1944", "1952", "1968", "1979", "1985", "1999", "2003"]
_ASPECTS = [
    "acting", "script", "music", "direction", "cinematography", "editing",
    "dialogue", "ending", "pacing", "cast",
]

# --- neutral plot summary: no sentiment signal --------------------------------------
_PLOT = [
    "The film follows {char}, a {occupation} living in {place}.",
    "Most of the story is set in {place}.",
    "When {event}, {char} has to {goal}.",
    "Along the way {char} meets {char2}, {relation}.",
    "Meanwhile, {char2} {action}.",
    "{char} {action}, and {char2} notices.",
    "Things get complicated when {event}.",
    "Most of the second half takes place in {place}.",
    "{char} and {char2} spend a lot of time talking about the past.",
    "There is a subplot about {char2}, {relation}, who {action}.",
    "Eventually {char} decides to {goal}.",
    "The movie runs about {minutes} minutes.",
    "It was shot on location in {place}.",
    "{actor} plays {char}, and {actor2} plays {char2}.",
    "The film is based on a novel by {person}.",
    "{char} works as a {occupation} and {action}.",
    "Later, {event}, and {char} {action}.",
    "I will not spoil what happens after {event}.",
    "The film opens with {char} at a train station in {place}.",
    "Without giving too much away, {char} has to {goal}.",
    "The score is by {person}, and the film was directed by {director}.",
    "I saw it on cable last week after reading about it here.",
    "My wife and I rented it on a Friday night.",
    "It was released on DVD a few years after it played in theaters.",
]
# Plot lines that carry the typographic quirks of real reviews.
_PLOT_QUIRKY = [
    "{char} keeps saying “I’m not going back there” — and of course goes back.",
    "The tagline on the poster reads “Some secrets don’t stay buried.”",
    "There’s a long scene in a café where {char} and {char2} argue about money.",
    "The film features a rock &amp; roll number at a wedding in {place}.",
    "{char}’s sister runs a café — the one where most of the story happens.",
]

# --- opinions ----------------------------------------------------------------------
_POS_OPINION = [
    "{actor} gives a wonderful performance as {char}.",
    "The cast is excellent, especially {actor}.",
    "{actor} is superb and completely believable as {char}.",
    "I loved every scene with {actor} in it.",
    "The story is clever and kept me guessing until the end.",
    "The script is sharp, funny and surprisingly moving.",
    "The dialogue feels natural and often very funny.",
    "The score by {person} is beautiful and never intrusive.",
    "The soundtrack is fantastic.",
    "{director} directs with real confidence and a great eye for detail.",
    "The direction is assured and the pacing is just right.",
    "The cinematography is gorgeous; every frame looks like a painting.",
    "The ending is touching and earned.",
    "It is funny, warm and smart.",
    "The chemistry between {actor} and {actor2} is terrific.",
    "Every performance is strong, even in the small parts.",
    "The {aspect} is brilliant.",
    "The {aspect} is outstanding.",
    "I really enjoyed the {aspect}.",
    "The film is a joy to watch.",
    "It is one of the most beautiful films of the decade.",
    "The characters are rich and memorable.",
    "It is gripping from the first scene to the last.",
    "I was moved to tears more than once.",
    "This is a genuinely entertaining {genre}.",
    "It is an absolute delight.",
]
_NEG_OPINION = [
    "{actor} gives a terrible performance as {char}.",
    "The cast is awful, especially {actor}.",
    "{actor} is wooden and completely unconvincing as {char}.",
    "I hated every scene with {actor} in it.",
    "The story is stupid and predictable from the start.",
    "The script is lazy, clumsy and painfully dull.",
    "The dialogue is laughable and often embarrassing.",
    "The score by {person} is loud and annoying.",
    "The soundtrack is horrible.",
    "{director} directs with no sense of timing at all.",
    "The direction is sloppy and the pacing is painfully slow.",
    "The cinematography is ugly and murky.",
    "The ending is ridiculous and makes no sense.",
    "It is boring, silly and pointless.",
    "There is zero chemistry between {actor} and {actor2}.",
    "Every performance is weak, even from the usually reliable {actor}.",
    "The {aspect} is terrible.",
    "The {aspect} is a mess.",
    "I really disliked the {aspect}.",
    "The film is a chore to sit through.",
    "It is one of the worst films of the decade.",
    "The characters are flat and forgettable.",
    "It is tedious from the first scene to the last.",
    "I almost fell asleep twice.",
    "This is a lame, cheap {genre}.",
    "It is an absolute disaster.",
]
# Sentences whose meaning is the review's sentiment but whose words point the other
# way: they defeat naive word counting, as negation does in real reviews.
_POS_NEGATED = [
    "It is not bad at all.",
    "I was not bored for a single minute.",
    "The {aspect} is never dull or predictable.",
    "I expected a boring mess, but I was wrong.",
    "The critics who called it stupid must have watched a different film.",
    "Nothing about it feels cheap or lazy.",
    "I can't think of a single weak performance.",
    "It is hardly the disaster some people claim.",
    "Don't let the awful poster put you off.",
    "It is not perfect, but it does not waste a minute.",
]
_NEG_NEGATED = [
    "I did not enjoy it.",
    "It is not good, not funny and not scary.",
    "I wanted to love this film.",
    "This is not the great film the trailer promised.",
    "Nobody will ever call this a masterpiece.",
    "The {aspect} is not exactly brilliant.",
    "I really wanted to like {actor} in this.",
    "It is far from the best {genre} I have seen.",
    "I was hoping for something wonderful and exciting.",
    "There is nothing fun or clever about it.",
]
_SARCASM = [
    "Great, another two hours of my life I will never get back.",
    "Oh wonderful, yet another twist nobody asked for.",
    "Brilliant idea: cast someone who cannot act in the lead.",
    "What a fantastic way to spend a Sunday afternoon.",
    "Sure, the {aspect} is perfect, if you like falling asleep.",
    "Congratulations to {director} for an amazing achievement in tedium.",
]
# Could go either way; real reviews are full of these.
_AMBIGUOUS = [
    "It is certainly a film I will remember.",
    "Well, it is different, I will give it that.",
    "I have mixed feelings about this one.",
    "Your mileage may vary.",
    "It is exactly what you would expect from a {genre}.",
    "I am still not sure what to make of the ending.",
    "It is the kind of movie my father would like.",
    "Some people will love it and some will hate it.",
    "I watched it twice, for different reasons.",
    "Fans of {actor} will know what to expect.",
]
# Softeners that introduce the "other side" in a mixed review.
_MIX_LEAD = ["That said, ", "On the other hand, ", "To be fair, ", "Still, ", "Admittedly, "]

_POS_OPENING = [
    "I loved {title}.",
    "What a wonderful surprise {title} turned out to be.",
    "{title} is one of the best {genre}s I have seen in years.",
    "I went into {title} with low expectations and came out delighted.",
    "This is a great little {genre}.",
]
_NEG_OPENING = [
    "I really hated {title}.",
    "What a disappointment {title} turned out to be.",
    "{title} is one of the worst {genre}s I have seen in years.",
    "I went into {title} with high hopes and came out annoyed.",
    "This is a lousy, forgettable {genre}.",
]
_NEUTRAL_OPENING = [
    "{title} is a {year} {genre} directed by {director}.",
    "I caught {title} on television the other night.",
    "{title} stars {actor} and {actor2}.",
    "I had never heard of {title} before a friend lent me the DVD.",
    "{title} is the kind of {genre} they rarely make anymore.",
]
_POS_VERDICT = [
    "Highly recommended.",
    "A must-see.",
    "Go see it, you will not regret it.",
    "I will definitely watch it again.",
    "One of my favorite films, period.",
    "Easily the best {genre} of the year.",
    "Overall, a wonderful film.",
    "Don't miss it.",
]
_NEG_VERDICT = [
    "Avoid at all costs.",
    "Save your money.",
    "Skip it.",
    "I will never watch it again.",
    "One of the worst films I have ever seen, period.",
    "Easily the worst {genre} of the year.",
    "Overall, a terrible film.",
    "Don't waste your time.",
]

# Weights follow real IMDB: extreme ratings are the most common.
_POS_RATINGS = (7, 8, 9, 10)
_POS_RATING_WEIGHTS = (0.22, 0.26, 0.17, 0.35)
_NEG_RATINGS = (1, 2, 3, 4)
_NEG_RATING_WEIGHTS = (0.40, 0.19, 0.20, 0.21)


# ---------------------------------------------------------------------------------
# Sentence and review construction.
# ---------------------------------------------------------------------------------


def _person(rng: random.Random) -> str:
    first = rng.choice(_ACCENTED_FIRST_NAMES if rng.random() < 0.03 else _FIRST_NAMES)
    return f"{first} {rng.choice(_LAST_NAMES)}"


def _title(rng: random.Random) -> str:
    # A few titles carry an HTML entity, as scraped IMDB text does.
    if rng.random() < 0.02:
        return rng.choice(_AMP_TITLES)
    return f"{rng.choice(_TITLE_FIRST)} {rng.choice(_TITLE_SECOND)}"


def _movie_facts(rng: random.Random) -> dict[str, str]:
    """The slot values one review refers to, so names stay consistent within it."""
    title = _title(rng)
    chars = rng.sample(_CHARACTERS, 2)
    return {
        "title": f"<i>{title}</i>" if rng.random() < 0.12 else title,
        "genre": rng.choice(_GENRES),
        "actor": _person(rng),
        "actor2": _person(rng),
        "director": _person(rng),
        "char": chars[0],
        "char2": chars[1],
        "year": rng.choice(_YEARS),
    }


def _fill(template: str, facts: dict[str, str], rng: random.Random) -> str:
    """Fill a template; per-sentence slots are drawn fresh for variety."""
    slots = dict(facts)
    slots.update(
        occupation=rng.choice(_OCCUPATIONS),
        place=rng.choice(_PLACES),
        event=rng.choice(_EVENTS),
        goal=rng.choice(_GOALS),
        relation=rng.choice(_RELATIONS),
        action=rng.choice(_ACTIONS),
        aspect=rng.choice(_ASPECTS),
        person=_person(rng),
        minutes=str(rng.randrange(85, 181)),
    )
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def _opinion_template(rng: random.Random, lean: int, strength: float) -> str:
    """Pick one opinion sentence for a review leaning `lean` (1 positive, 0 negative).

    `strength` (0..1) is how extreme the rating is: mild reviews are more mixed.
    """
    own, other = (_POS_OPINION, _NEG_OPINION) if lean else (_NEG_OPINION, _POS_OPINION)
    negated = _POS_NEGATED if lean else _NEG_NEGATED
    r = rng.random()
    p_other = 0.24 - 0.10 * strength  # the complaint in a positive review, and vice versa
    if r < p_other:
        return rng.choice(_MIX_LEAD) + _lower_first(rng.choice(other))
    r -= p_other
    if r < 0.10:
        return rng.choice(negated)
    r -= 0.10
    if r < 0.05:
        # Sarcasm praises in order to pan, so it only appears in negative-leaning text.
        return rng.choice(_SARCASM) if not lean else rng.choice(_AMBIGUOUS)
    r -= 0.05
    if r < 0.08:
        return rng.choice(_AMBIGUOUS)
    return rng.choice(own)


def _lower_first(text: str) -> str:
    # Keep names and "I" capitalized: only lower a leading common word.
    head, _, rest = text.partition(" ")
    if head in {"The", "It", "Every", "There", "This"}:
        return head.lower() + " " + rest
    return text


def _target_words(rng: random.Random) -> int:
    """Review length in words, shaped like IMDB: lognormal body, long tail, one-liners."""
    r = rng.random()
    if r < 0.03:
        return 0  # one or two sentences
    if r < 0.04:
        return rng.randrange(1050, 1500)
    if r < 0.08:
        return rng.randrange(600, 1050)
    return int(min(450, max(70, rng.lognormvariate(math.log(175), 0.42))))


def _sentences_until(budget: int, make: Callable[[], str], used: set[str]) -> list[str]:
    """Sentences from `make` until `budget` words, avoiding repeats within one review."""
    out: list[str] = []
    words = 0
    while words < budget:
        # A few retries suffice; a rare repeat in a very long review is harmless.
        for _ in range(5):
            sentence = make()
            if sentence not in used:
                break
        used.add(sentence)
        out.append(sentence)
        words += len(sentence.split())
    return out


def _short_review(rng: random.Random, facts: dict[str, str], lean: int, strength: float) -> list[list[str]]:
    verdicts = _POS_VERDICT if lean else _NEG_VERDICT
    first = _fill(_opinion_template(rng, lean, strength), facts, rng)
    if rng.random() < 0.5:
        return [[first]]
    return [[first, _fill(rng.choice(verdicts), facts, rng)]]


def _paragraphs(rng: random.Random, lean: int, strength: float, rating_text: str | None) -> list[list[str]]:
    """Build a review as paragraphs of sentences: opinion, plot, opinion, verdict.

    Long reviews put opinion at both ends and neutral plot in the middle, as real
    reviewers do, so a model must not rely on the first few hundred tokens only.
    """
    facts = _movie_facts(rng)
    target = _target_words(rng)
    if target == 0:
        return _short_review(rng, facts, lean, strength)

    openings = _POS_OPENING if lean else _NEG_OPENING
    verdicts = _POS_VERDICT if lean else _NEG_VERDICT

    def opinion() -> str:
        return _fill(_opinion_template(rng, lean, strength), facts, rng)

    def plot_sentence() -> str:
        pool = _PLOT_QUIRKY if rng.random() < 0.03 else _PLOT
        return _fill(rng.choice(pool), facts, rng)

    # Some reviews open neutrally and save the opinion for later.
    opening_pool = _NEUTRAL_OPENING if rng.random() < 0.35 else openings
    intro = [_fill(rng.choice(opening_pool), facts, rng)]
    used = set(intro)
    plot_share = 0.65 if target > 500 else rng.uniform(0.25, 0.5)
    opinion_words = target * (1 - plot_share)
    intro += _sentences_until(int(opinion_words * 0.3), opinion, used)
    plot_sents = _sentences_until(int(target * plot_share), plot_sentence, used)
    body = _sentences_until(int(opinion_words * 0.7), opinion, used)
    ending = [_fill(rng.choice(verdicts), facts, rng)]
    if rating_text:
        ending.append(rating_text)

    paragraphs = [intro]
    paragraphs += _chunk(rng, plot_sents)
    paragraphs += _chunk(rng, body)
    paragraphs.append(ending)
    return [p for p in paragraphs if p]


def _chunk(rng: random.Random, sentences: list[str]) -> list[list[str]]:
    """Split sentences into paragraphs of 3-7."""
    out: list[list[str]] = []
    i = 0
    while i < len(sentences):
        size = rng.randrange(3, 8)
        out.append(sentences[i : i + size])
        i += size
    return out


def _render(rng: random.Random, paragraphs: list[list[str]]) -> str:
    """Join paragraphs with the markup and typography quirks of scraped IMDB text."""
    double_space = rng.random() < 0.12
    curly = rng.random() < 0.15
    rendered = []
    for sentences in paragraphs:
        joints = ["  " if double_space and rng.random() < 0.3 else " " for _ in sentences[1:]]
        text = sentences[0]
        for joint, sentence in zip(joints, sentences[1:]):
            text += joint + sentence
        rendered.append(text)
    # About half of real reviews separate paragraphs with <br /><br />.
    separator = "<br /><br />" if rng.random() < 0.5 else " "
    text = separator.join(rendered)
    if curly:
        text = text.replace("'", "\u2019")
    return text


def _one_review(rng: random.Random, label: int) -> tuple[str, int, int]:
    ratings, weights = (_POS_RATINGS, _POS_RATING_WEIGHTS) if label else (_NEG_RATINGS, _NEG_RATING_WEIGHTS)
    rating = rng.choices(ratings, weights)[0]
    strength = (rating - 7) / 3 if label else (4 - rating) / 3
    # Label noise: the wording leans the other way but the rating stays.
    noisy = rng.random() < _NOISE_RATE
    lean = 1 - label if noisy else label
    rating_text = f"{rating}/10." if not noisy and rng.random() < 0.15 else None
    text = _render(rng, _paragraphs(rng, lean, strength, rating_text))
    return text, label, rating


def _pool(seed: int, size: int) -> list[tuple[str, int, int]]:
    """Reviews reposted across splits; item i depends only on seed and i (prefix-stable)."""
    rng = random.Random(seed + _POOL_OFFSET)
    return [_one_review(rng, 1 - i % 2) for i in range(size)]


def _place(
    rng: random.Random,
    reviews: list[tuple[str, int, int]],
    items: Sequence[tuple[str, int, int]],
    taken: set[int],
) -> None:
    """Overwrite random positions of the same label with `items`, in place.

    Positions in `taken` are left alone (and the new ones added), so a later round of
    placements cannot erase an earlier one.
    """
    for item in items:
        candidates = [i for i, r in enumerate(reviews) if r[1] == item[1] and i not in taken]
        if not candidates:
            return
        pos = rng.choice(candidates)
        taken.add(pos)
        reviews[pos] = item


def _overlap_count(n_per_label: int) -> int:
    return max(1, round(_OVERLAP_RATE * 2 * n_per_label))


def generate_reviews(n_per_label: int, *, seed: int, split: str) -> list[tuple[str, int, int]]:
    """(text, label, rating) tuples, label 1 = positive; pure function used by write_sample_corpus.

    Returns `n_per_label` reviews of each label. Train holds ~1% exact duplicates and
    the cross-split pool; test holds ~0.5% reviews from the same pool, so they appear
    verbatim in a train split of the same seed whose size is at least the test's.
    """
    if n_per_label < 1:
        raise ValueError(f"n_per_label must be >= 1, got {n_per_label}")
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_OFFSETS)}, got {split!r}")
    rng = random.Random(seed + _SPLIT_OFFSETS[split])
    reviews = [_one_review(rng, label) for label in (1, 0) for _ in range(n_per_label)]
    # Cross-split reposts: test takes a prefix of the pool that train contains whole
    # whenever train is at least as large.
    taken: set[int] = set()
    _place(rng, reviews, _pool(seed, _overlap_count(n_per_label)), taken)
    if split == "train":
        _add_duplicates(rng, reviews, taken)
    return reviews


def _add_duplicates(rng: random.Random, reviews: list[tuple[str, int, int]], taken: set[int]) -> None:
    """Repost ~1% of reviews under another id, as happens in the real train split."""
    n_dup = max(1, round(_TRAIN_DUPLICATE_RATE * len(reviews)))
    free = [i for i in range(len(reviews)) if i not in taken]
    sources = rng.sample(free, min(n_dup, len(free)))
    taken.update(sources)  # a source overwritten by another copy would not be a duplicate
    _place(rng, reviews, [reviews[i] for i in sources], taken)


# ---------------------------------------------------------------------------------
# Writing the tree.
# ---------------------------------------------------------------------------------


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _write_split(split_dir: pathlib.Path, reviews: list[tuple[str, int, int]]) -> None:
    next_id = {1: 0, 0: 0}
    for text, label, rating in reviews:
        folder = split_dir / ("pos" if label else "neg")
        path = folder / f"{next_id[label]}_{rating}.txt"
        next_id[label] += 1
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def _remove_previous(target: pathlib.Path) -> None:
    """Replace an earlier synthetic corpus, but never a real aclImdb folder."""
    if not target.exists():
        return
    readme = target / "README"
    ours = readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(_README_MARKER)
    if not ours:
        raise FileExistsError(f"{target} exists and is not a synthetic sample corpus; refusing to overwrite it")
    shutil.rmtree(target)


def write_sample_corpus(
    root: pathlib.Path,
    *,
    train_per_label: int = SAMPLE_TRAIN_PER_LABEL,
    test_per_label: int = SAMPLE_TEST_PER_LABEL,
    seed: int = 0,
) -> pathlib.Path:
    """Writes the aclImdb tree under root and returns root / "aclImdb". Refuses (ValueError naming the argument) counts < 1.

    The tree is built in a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half-written corpus that looks complete. An earlier
    synthetic corpus at the same place is replaced; a real one is refused.
    """
    _check_count("train_per_label", train_per_label)
    _check_count("test_per_label", test_per_label)
    root = pathlib.Path(root)
    target = root / "aclImdb"
    staging = root / f".aclImdb.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        for split, n in (("train", train_per_label), ("test", test_per_label)):
            for label_dir in ("pos", "neg"):
                (staging / split / label_dir).mkdir(parents=True)
            _write_split(staging / split, generate_reviews(n, seed=seed, split=split))
        readme = _README.format(seed=seed, train=train_per_label, test=test_per_label)
        with open(staging / "README", "w", encoding="utf-8", newline="") as f:
            f.write(readme)
        _remove_previous(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pipelines.data.sample_corpus ROOT`: write the corpus and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=pathlib.Path, help="folder to create aclImdb/ in")
    parser.add_argument("--train-per-label", type=int, default=SAMPLE_TRAIN_PER_LABEL)
    parser.add_argument("--test-per-label", type=int, default=SAMPLE_TEST_PER_LABEL)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = write_sample_corpus(
            args.root,
            train_per_label=args.train_per_label,
            test_per_label=args.test_per_label,
            seed=args.seed,
        )
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)


if __name__ == "__main__":
    main()
