"""The final-layer check's rules: which descriptions name a class (no model needed)."""

from __future__ import annotations

import pytest

from neuroscribe.describe.stage import class_terms, final_layer_targets, names_any


def names(description: str, cls: str) -> bool:
    return names_any(description, class_terms(cls))


@pytest.mark.parametrize(("description", "cls"), [
    ("golf ball", "golf ball"),
    ("golf balls", "golf ball"),  # plural
    ("Golf Ball", "golf ball"),  # case
    ("tench", "tench"),
    ("English springer spaniel", "English springer"),  # a WordNet synonym (another lemma of the class)
    ("chainsaw", "chain saw"),
    ("petrol pump", "gas pump"),
    ("chute", "parachute"),
    ("dustcart", "garbage truck"),
    ("English springer", "dog"),  # a hyponym: the class below names the category
    ("spaniel", "dog"),
    ("garbage truck", "truck"),
    ("the word tench", "tench"),  # the class name written on the images, read where the unit fires
    ("the word church", "church"),
])
def test_the_class_its_synonyms_hyponyms_and_its_written_name_count(description: str, cls: str) -> None:
    assert names(description, cls)


@pytest.mark.parametrize(("description", "cls"), [
    ("ball", "golf ball"),  # hypernyms are true of the class's images but do not single it out
    ("game equipment", "golf ball"),
    ("dog", "English springer"),
    ("spaniel", "English springer"),
    ("springer spaniel", "English springer"),
    ("sporting dog", "English springer"),
    ("truck", "garbage truck"),
    ("motor vehicle", "garbage truck"),
    ("fish", "tench"),
    ("pump", "gas pump"),
    ("place of worship", "church"),
    ("monastery", "church"),  # a sibling is not the class
    ("the word kadoshop", "gas pump"),
    ("the word golf", "golf ball"),  # part of the name
    ("text", "tench"),
])
def test_hypernyms_siblings_and_other_words_do_not_count(description: str, cls: str) -> None:
    assert not names(description, cls)


def test_class_terms_for_a_name_wordnet_does_not_know() -> None:
    assert class_terms("Widget") == ("widget",)
    assert names("a widget", "Widget") and not names("widgetry", "Widget")


class Rec:
    """What final_layer_targets reads of a recording."""

    def __init__(self, model_names: list[str], probe_names: list[str]) -> None:
        self.meta = {"lm_class_names": model_names, "class_names": probe_names,
                     "layers": {"fc": {"kind": "flat"}, "conv": {"kind": "conv"}}}
        self.layers = ["conv", "fc"]

    def units(self, layer: str) -> int:
        return len(self.meta["lm_class_names"]) if layer == "fc" else 64


def test_final_layer_targets_match_by_name_or_synonym() -> None:
    model = ["tench", "chain saw", "English springer", "cassette player"]
    layer, units = final_layer_targets(Rec(model, ["Tench", "chainsaw", "English springer spaniel", "unicorn"]))
    assert layer == "fc" and units == {0: "Tench", 1: "chainsaw", 2: "English springer spaniel"}
    assert final_layer_targets(Rec(model, ["unicorn"])) is None
    assert final_layer_targets(Rec([], ["tench"])) is None
