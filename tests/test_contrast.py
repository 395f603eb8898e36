"""The offline describer's choice of words: contrast with the fixed ImageNet background (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuroscribe.describe.background import COLOUR_RATES, TEXT_RATES, WORD_SHARE, Background
from neuroscribe.describe.contrast import SPECIFIC_SHARE, contrast, merge_fragments
from neuroscribe.describe.tagger import Candidate


@pytest.fixture(scope="module")
def bg() -> Background:
    return Background()


def label(p: str, w: float) -> Candidate:
    return Candidate(p, "label", w)


def hyper(p: str, w: float) -> Candidate:
    return Candidate(p, "hypernym", w)


def word(w: str, conf: float = 0.9) -> list[Candidate]:
    return [Candidate(p, "text", conf) for p in ("text", "letters", f"the word {w}")]


def best(views, bg, **kw) -> str:
    return contrast(views, bg, **kw)[0].description


# ------------------------------------------------------------------------------------------------ background


def test_background_rates_follow_the_class_list_not_the_probe(bg: Background) -> None:
    assert bg.rate("golf ball") == pytest.approx(1 / 1000)
    assert bg.rate("crane") == pytest.approx(2 / 1000)  # two ImageNet classes are called "crane"
    # a hypernym: the share of the classes the tagger puts under it (its weight sums exactly their probabilities)
    under_ball = bg.membership[bg.hypernym_names.index("ball")]
    assert bg.rate("ball") == pytest.approx(under_ball.sum() / 1000) and bg.rate("ball") > 5 / 1000
    assert bg.rate("dog") > 20 * bg.rate("English springer")
    assert bg.rate("text") == TEXT_RATES["text"] and bg.rate("the word stop") == TEXT_RATES["letters"] * WORD_SHARE
    assert bg.rate("red") == COLOUR_RATES["red"]
    assert bg.rate("orange") == pytest.approx(COLOUR_RATES["orange"] + bg._wordnet["orange"])  # fruit and colour


def test_ancestors_are_the_more_general_phrases(bg: Background) -> None:
    assert {"ball", "game equipment"} <= bg.ancestors("golf ball")
    assert {"spaniel", "dog"} <= bg.ancestors("English springer") and "English springer" not in bg.ancestors("dog")
    assert bg.ancestors("the word stop") == {"letters", "text"} and bg.ancestors("letters") == {"text"}
    assert bg.ancestors("text") == frozenset() and bg.ancestors("not a phrase") == frozenset()


# ------------------------------------------------------------------------------------------------ score


def test_score_is_typicality_times_pmi_in_nats_against_the_fixed_background(bg: Background) -> None:
    views = [[label("golf ball", 0.9)], [label("golf ball", 0.5)], [], [label("tench", 0.2)]]
    got = {r.description: r for r in contrast(views, bg, top=5)}
    t = (0.9 + 0.5) / 4
    assert got["golf ball"].typicality == pytest.approx(t) and got["golf ball"].support == 2
    assert got["golf ball"].pmi == pytest.approx(math.log(t * 1000))
    assert got["golf ball"].score == pytest.approx(t * math.log(t * 1000))
    every = contrast([[Candidate("text", "text", 1.0)]] * 3, bg)[0]
    assert every.score == pytest.approx(-math.log(TEXT_RATES["text"]))  # "text" in every view: log 4 nats
    # fixed scale: a unit's score does not depend on which other units or probe images exist
    assert contrast(views, bg)[0] == contrast(views, Background())[0]


def test_alpha_weighs_the_background(bg: Background) -> None:
    views = [[hyper("dog", 1.0), label("beagle", 0.3)] for _ in range(4)]
    assert best(views, bg, alpha=1.0) == "dog"
    assert contrast(views, bg, alpha=0.0)[0].score == pytest.approx(0.0)  # T log T: the most typical wins
    assert best(views, bg, alpha=0.0) == "dog"


# ------------------------------------------------------------------------------------------------ specific first


def test_golf_ball_unit_is_golf_ball_not_ball(bg: Background) -> None:
    views = [
        [label("golf ball", 0.9), hyper("ball", 0.92), hyper("game equipment", 0.92)],
        [label("golf ball", 0.6), label("croquet ball", 0.2), hyper("ball", 0.85), hyper("game equipment", 0.85)],
        [label("golf ball", 0.8), hyper("ball", 0.8), hyper("game equipment", 0.8)],
        [label("golf ball", 0.3), label("tee", 0.3), hyper("ball", 0.35)],
    ]
    ranked = [r.description for r in contrast(views, bg)]
    assert ranked[0] == "golf ball" and ranked.index("ball") > 0


def test_a_hyponym_carrying_half_its_hypernym_wins(bg: Background) -> None:
    """pump and gas pump have the same background rate (only one class under pump), so the more typical pump
    scores higher: the rule, not the score, puts gas pump first while it is at least SPECIFIC_SHARE as typical."""
    assert bg.rate("pump") == bg.rate("gas pump") and "pump" in bg.ancestors("gas pump")

    def unit(share: float) -> list[list[Candidate]]:
        return [[hyper("pump", 0.8), label("gas pump", 0.8 * share)]] * 3

    nearly = contrast(unit(SPECIFIC_SHARE), bg)
    assert [r.description for r in nearly[:2]] == ["gas pump", "pump"]
    assert nearly[0].score < nearly[1].score  # each keeps its own score; the rule only orders them
    assert best(unit(SPECIFIC_SHARE - 0.01), bg) == "pump"  # clearly less typical: the general word stays
    assert best(unit(1.0), bg) == "gas pump"


def test_a_unit_for_a_whole_category_keeps_the_category(bg: Background) -> None:
    """Many breeds, each in a few views: "dog" (every view), not the breed with the largest PMI."""
    breeds = ["beagle", "English springer", "Border collie", "golden retriever", "pug"]
    views = [[hyper("dog", 0.95), label(breeds[i % 5], 0.6)] for i in range(15)]
    ranked = contrast(views, bg)
    assert ranked[0].description == "dog"
    beagle = next(r for r in ranked if r.description == "beagle")
    assert beagle.pmi > ranked[0].pmi  # PMI alone would have said "beagle"


def test_a_consistent_word_beats_text_and_a_one_off_word_loses(bg: Background) -> None:
    assert best([word("stop") for _ in range(5)], bg) == "the word stop"
    gas = [[label("gas pump", 0.8), hyper("pump", 0.8)] for _ in range(14)] + [word("kadoshop")]
    assert best(gas, bg) == "gas pump"
    garbage = [[label("garbage truck", 0.5), hyper("truck", 0.7), hyper("motor vehicle", 0.9)] for _ in range(10)]
    assert best(garbage + [word("kadoshop")], bg) == "garbage truck"


def test_one_view_is_not_a_pattern(bg: Background) -> None:
    """Five exemplars, one a confident chain saw: what every view shares ranks first, though the one-off class has
    the larger score (a fifth of the unit's weight at PMI log 950)."""
    views = [[Candidate("white", "colour", 0.4)] for _ in range(5)]
    views[2] = views[2] + [label("chain saw", 0.95), hyper("power saw", 0.95)]
    ranked = contrast(views, bg)
    assert [r.description for r in ranked[:1]] == ["white"] and ranked[0].support == 5
    saw = next(r for r in ranked if r.description == "chain saw")
    assert saw.support == 1 and saw.score > ranked[0].score
    assert best([[label("chain saw", 0.95)], [Candidate("white", "colour", 0.4)]] * 1, bg) == "chain saw"


# ------------------------------------------------------------------------------------------------ OCR fragments


def test_fragments_of_one_word_add_up(bg: Background) -> None:
    views = [word("eng", 0.8), word("engl", 0.9), word("english", 0.7), word("cafe"), word("sale"), word("open")]
    ranked = contrast(views, bg, top=10)
    assert ranked[0].description == "the word english" and ranked[0].support == 3
    assert ranked[0].typicality == pytest.approx((0.8 + 0.9 + 0.7) / 6)
    assert not {"the word eng", "the word engl"} & {r.description for r in ranked}


def test_a_name_of_two_words_is_read_as_that_name(bg: Background) -> None:
    """OCR reads "French horn" on the unit's views: "the word french horn" (under "the word french" and "the word
    horn", as rare as one word) is the description, not whichever single word sorts first."""
    def line(*ws, conf=0.9):
        return word(ws[0], conf) + [Candidate(f"the word {w}", "text", conf) for w in ws[1:]] + (
            [Candidate("the word " + " ".join(ws), "text", conf)] if len(ws) > 1 else [])
    assert bg.ancestors("the word french horn") == {"letters", "text", "the word french", "the word horn"}
    assert bg.rate("the word french horn") == bg.rate("the word french") == TEXT_RATES["letters"] * WORD_SHARE
    views = [line("french", "horn") for _ in range(6)] + [line("french") for _ in range(2)]
    ranked = contrast(views, bg, top=4)
    assert ranked[0].description == "the word french horn" and ranked[0].support == 6
    # a word read alone in most views stays that word: the phrase holds in under half of its views
    views = [line("french") for _ in range(7)] + [line("french", "horn")]
    assert best(views, bg) == "the word french"
    # a name of two words is no rarer than one word: read in 5 of 15 views it loses to a word read in 7 (the church
    # logit of the text-trained model, whose views also show "French horn"; with the words' rates multiplied it won)
    views = ([word("church") for _ in range(7)] + [line("french", "horn") for _ in range(5)]
             + [[label("church", 0.6)] for _ in range(3)])
    assert best(views, bg) == "the word church"
    # a single word is never merged into a phrase that contains it (fragments are of one word)
    merged = merge_fragments([line("french"), line("french", "horn")])
    assert "the word french" in {c.phrase for c in merged[0]}


def test_fragment_merging_rules() -> None:
    merged = merge_fragments([word("eng") + word("english", 0.5), word("on"), word("london"), word("glish")])
    phrases = [{c.phrase for c in v} for v in merged]
    assert phrases[0] == {"text", "letters", "the word english"}
    assert [c.weight for c in merged[0] if c.phrase == "the word english"] == [0.9]  # a view keeps its largest
    assert "the word on" in phrases[1]  # two letters: too short to merge
    assert "the word english" in phrases[3]  # a substring, not only a prefix
    # the longest word holding the fragment wins, then the most views, then the alphabet
    tie = merge_fragments([word("ran"), word("brand"), word("grand"), word("grand")])
    assert "the word grand" in {c.phrase for c in tie[0]}
    assert merge_fragments([[label("golf ball", 0.9)]]) == [[label("golf ball", 0.9)]]


# ------------------------------------------------------------------------------------------------ edges


def test_deterministic_order_invariant_and_edge_cases(bg: Background) -> None:
    views = [word("stop") + [label("tench", 0.8), hyper("fish", 0.8)], word("open") + [label("church", 0.6)]]
    first = contrast(views, bg)
    assert contrast([list(reversed(v)) for v in reversed(views)], bg) == first
    tie = contrast([[label("zebra", 0.5), label("tench", 0.5)]], bg, top=2)
    assert [r.description for r in tie] == ["tench", "zebra"] and tie[0].score == tie[1].score
    assert contrast([], bg) == [] and contrast([[], []], bg) == []
    assert contrast([[label("tench", 1.0)], []], bg)[0].typicality == 0.5
    with pytest.raises(ValueError, match="top"):
        contrast(views, bg, top=0)
    scores = [r.score for r in contrast(views, bg, top=10)]
    assert np.all(np.isfinite(scores))
