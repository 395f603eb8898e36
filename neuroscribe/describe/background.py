"""The fixed background every tagger description is contrasted against: a view of a random ImageNet photo.

A unit's description must be typical of *its* exemplars and rare in general. "In general" is fixed here, never the
probe set: on a 10-class probe the class words are everywhere in the probe, so contrasting against the probe would
make them lose to hypernyms and one-off OCR fragments. :meth:`Background.rate` is the expected tagger weight of a
phrase on one view of a random ImageNet-1k photo (the same quantity the summariser's typicality averages over a
unit's views, so the two are on one scale):

* an ImageNet class name: ``1/1000`` per class with that name (each class equally likely, the classifier's
  probability averaging to the class's share);
* a WordNet hypernym: the share of the 1000 classes under it within the tagger's ``hypernym_depth`` informative
  levels (the tagger's weight for a hypernym is the summed probability of exactly those classes), e.g.
  "ball" 9/1000, "dog" ~0.1;
* text: :data:`TEXT_RATES` ("text", "letters", "digits", "number"), and "the word X" = ``TEXT_RATES["letters"] *``
  :data:`WORD_SHARE`, measured/assumed as documented there; a name of several words ("the word french horn") is as
  rare as one word, not as its words multiplied (see :meth:`Background.rate`);
* colour names: :data:`COLOUR_RATES`, measured like the text rates;
* anything else: :data:`UNKNOWN_RATE`.

It also knows which phrases are more specific than which (:meth:`Background.ancestors`): a class is under its
WordNet hypernyms, and "the word X" is under "letters" and "text", for the summariser's specific-before-general
rule.
"""

from __future__ import annotations

import numpy as np

from .wordnet import ImageNetVocabulary, default_vocabulary

__all__ = ["COLOUR_FLOOR", "COLOUR_RATES", "TEXT_RATES", "UNKNOWN_RATE", "WORD_SHARE", "Background"]

#: Mean tagger weight (best OCR line confidence, 0 where absent) of each text phrase on a whole, unmasked view of the
#: 500 ImageNet photos shipped in ``neuroscribe/data/sample``, centre-cropped to 224 px (``tools/background_rates.py``:
#: text was read on 6% of them). Those are 10 Imagenette classes, several with printed text (gas pumps, cassette
#: players, trucks), and a whole view holds more text than a masked one: the rates are generous, so a text
#: description has to earn its score.
TEXT_RATES: dict[str, float] = {"text": 0.059, "letters": 0.047, "digits": 0.017, "number": 0.017}

#: The chance that a view with letters shows one *given* word: 1 in 10,000 (no word list of printed text in photos
#: ships offline; this puts a word read in every view of a unit far above "text", a word read once in 15 below it).
WORD_SHARE: float = 1e-4

#: Mean tagger weight (pixel fraction when among the two dominant colours covering >= 15%, else 0) of each basic
#: colour name on the same 500 whole views (``tools/background_rates.py``), floored at :data:`COLOUR_FLOOR`. A
#: unit's own colour weights are smaller than these raw fractions: the tagger names a colour only where it is unusual
#: for the probe and discounts the probe's share (:func:`~neuroscribe.describe.colours.unusual_colours`), so a
#: colour description must be both unusual for the probe and frequent against this background.
COLOUR_FLOOR: float = 0.001
COLOUR_RATES: dict[str, float] = {
    "black": 0.107, "white": 0.047, "gray": 0.42, "red": 0.0069, "orange": COLOUR_FLOOR, "yellow": 0.0024,
    "green": 0.021, "blue": 0.06, "purple": 0.0032, "pink": COLOUR_FLOOR, "brown": 0.136,
}

#: Rate of a phrase the tagger never emits (e.g. a caption word): as rare as one ImageNet class.
UNKNOWN_RATE: float = 1e-3

_WORD_PREFIX = "the word "


class Background:
    """Background rates and the specific/general relation of the tagger's phrases.

    ``hypernym_depth`` must be the tagger's: a hypernym's rate counts the classes whose first ``hypernym_depth``
    informative ancestors include it. :attr:`membership` (``[len(hypernym_names), 1000]``, 1 where a class is under
    a hypernym) is what the tagger multiplies a view's class probabilities by to get its hypernym weights.
    """

    def __init__(self, vocabulary: ImageNetVocabulary | None = None, hypernym_depth: int = 3) -> None:
        vocab = vocabulary or default_vocabulary()
        n = len(vocab)
        per_class = [vocab.hypernyms(i, hypernym_depth) for i in range(n)]
        self.hypernym_names: list[str] = sorted({h for hs in per_class for h in hs})
        index = {h: k for k, h in enumerate(self.hypernym_names)}
        self.membership = np.zeros((len(self.hypernym_names), n), dtype=np.float64)
        classes: dict[str, set[int]] = {}
        for i, hs in enumerate(per_class):
            self.membership[[index[h] for h in hs], i] = 1.0
            for p in (vocab.name(i), *hs):
                classes.setdefault(p, set()).add(i)
        self._wordnet: dict[str, float] = {p: len(c) / n for p, c in classes.items()}
        above: dict[str, set[str]] = {}
        for i in range(n):  # the whole informative chain: "dog" is above "English springer" at any depth
            chain = [vocab.name(i), *vocab.hypernyms(i)]
            for k, p in enumerate(chain):
                above.setdefault(p, set()).update(a for a in chain[k + 1:] if a != p)
        self._above = {p: frozenset(a) for p, a in above.items()}

    def rate(self, phrase: str) -> float:
        """Expected tagger weight of ``phrase`` on a view of a random ImageNet photo (see the module docstring).

        A phrase that is both a class/hypernym and a colour ("orange") gets the sum of both rates.

        "The word X Y" (OCR words of one line) gets the rate of one word. Its words are not independent draws: a
        view that reads "french" and "horn" on one line mostly shows the name "French horn", so multiplying the
        words' rates (``WORD_SHARE ** 2``, what this did until 2026-12-06) put a two-word name 9.2 nats per view
        above a one-word one, and a name read in 4 of a unit's 15 views beat one read in 7 ("the word french horn"
        over "the word church" for the church logit of the text-trained model, seeds 1 and 4 of the study). One
        word's rate is the upper bound (a name is shown no more often than its rarest word) and the convention of
        ``wordfreq``, whose frequency of a phrase is about that of its rarest word (``word_frequency("french horn")``
        1.24e-5, "horn" 1.38e-5, "french" 1.23e-4). A name still ranks ahead of its single words when it carries
        half their weight: it is under each of them (:meth:`ancestors`, the summariser's specific-before-general
        rule)."""
        if phrase.startswith(_WORD_PREFIX):  # one word, or a name of several: as rare as one word (see above)
            return TEXT_RATES["letters"] * WORD_SHARE
        if phrase in TEXT_RATES:
            return TEXT_RATES[phrase]
        r = self._wordnet.get(phrase, 0.0) + COLOUR_RATES.get(phrase, 0.0)
        return min(r, 1.0) if r > 0 else UNKNOWN_RATE

    def ancestors(self, phrase: str) -> frozenset[str]:
        """The more general phrases ``phrase`` falls under: its WordNet ancestors (informative ones, any depth), or
        "letters" and "text" for "the word X" (and each of its words for a phrase of several, "the word french" for "the
        word french horn"), "text" for "letters", "digits" and "number"."""
        if phrase.startswith(_WORD_PREFIX):  # "the word french horn" is under "the word french" and "the word horn"
            words = phrase[len(_WORD_PREFIX):].split()
            singles = {_WORD_PREFIX + w for w in words} if len(words) > 1 else set()
            return frozenset({"letters", "text", *singles})
        if phrase in TEXT_RATES and phrase != "text":
            return frozenset({"text"})
        return self._above.get(phrase, frozenset())
