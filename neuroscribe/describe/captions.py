"""Captions -> candidate phrases: clean a captioner's output (BLIP's filler tokens, the prompt, determiners) and
cut it into the noun phrases the summariser weighs (:func:`caption_candidates`)."""

from __future__ import annotations

import re

from .tagger import Candidate

__all__ = ["caption_candidates", "clean_caption"]


_ARTIFACTS = re.compile(r"\b(?:ara+f+e*d*|araffe|arafe)\b\s*")  # BLIP's well-known "arafed" filler tokens
_BOUNDARY = frozenset("""
    of on in at with without by near next to from into onto under over above below behind beside besides between
    among around through across along against toward towards inside outside underneath beneath for while during
    and or but nor so as than that which who whose whom where when like
    is are was were be been being has have had having do does did
    sitting sits sit standing stands stand laying lays lay lying lies lie holding holds hold playing plays play
    walking walks walk running runs run riding rides ride flying flies fly eating eats eat wearing wears wear
    looking looks look swimming swims swim driving drives drive parked hanging hangs hang covered filled made
    shown seen taken showing posing poses pose waiting waits wait jumping jumps jump resting rests rest
    """.split())
_DETERMINERS = frozenset("""
    a an the this that these those some any each every its their his her our my your there here it
    one two three four five six seven eight nine ten several many few lots lot bunch couple group pair number
    very
    """.split())
_FILLER = frozenset("""
    picture pictures photo photos photograph image images view close closeup up shot shots scene background
    foreground front top side bottom kind type something someone thing things blurry blurred dark
    other others another them it
    """.split())


def clean_caption(text: str, prompt: str | None = None) -> str:
    """Lower-case, strip the prompt from the front, drop BLIP's "arafed" artifacts, collapse white space."""
    s = " ".join(text.split())
    if prompt:
        p = " ".join(prompt.split())
        if s.lower().startswith(p.lower()):
            s = s[len(p):]
    s = _ARTIFACTS.sub("", s.lower())
    return " ".join(s.split()).strip(" .,;:!?\"'")


def caption_candidates(caption: str) -> list[Candidate]:
    """The caption itself and its noun-phrase-like fragments, each as a :class:`Candidate` of weight 1.0.

    Fragments are the runs of words between boundary words (prepositions, conjunctions, auxiliaries and common
    captioner verbs) and punctuation, with leading determiners/numbers removed; a fragment made only of filler
    words ("picture", "close up", ...) is dropped. Empty captions give ``[]``.
    """
    caption = caption.strip()
    if not caption:
        return []
    out = [Candidate(caption, "caption", 1.0)]
    seen = {caption}
    for chunk in re.split(r"[,.;:!?()\"]+", caption):
        run: list[str] = []
        for word in chunk.split() + [""]:
            if word and word not in _BOUNDARY:
                run.append(word)
                continue
            while run and run[0] in _DETERMINERS:
                run.pop(0)
            phrase = " ".join(run)
            run = []
            if phrase and phrase not in seen and not all(w in _FILLER for w in phrase.split()) \
                    and any(ch.isalpha() for ch in phrase):
                seen.add(phrase)
                out.append(Candidate(phrase, "phrase", 1.0))
    return out
