"""The describer interface: a unit's exemplar views in, ranked candidate descriptions with scores out.

Backends (``describe.backend`` in the job config):

- ``tagger``     offline: ImageNet classifier labels + WordNet hypernyms, OCR text, colour names
                 (:mod:`neuroscribe.describe.tagger`), chosen against a fixed ImageNet background by
                 :mod:`neuroscribe.describe.contrast`;
- ``captioner``  any Hugging Face image-to-text model (:mod:`neuroscribe.describe.captioner`), summarised by
                 :mod:`neuroscribe.describe.summarise` against other units' captions;
- ``clip``       CLIP-Dissect: open_clip embeddings + soft-WPMI over a vocabulary (:mod:`neuroscribe.describe.clip`).

Every backend sees the same :class:`UnitViews` (built by :mod:`neuroscribe.describe.views`) and returns one
:class:`Described` per unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from ..record.exemplars import Recording


@dataclass
class UnitViews:
    """What a describer sees of one unit: its top exemplars in the model's field of view, at the view size."""

    layer: str
    unit: int
    image_ids: list[int]
    scores: list[float]
    images: list[Image.Image]          # the exemplar images (model's field of view, view size S from the source)
    masks: list[np.ndarray]            # bool [S, S]: where the unit fired above its threshold
    views: list[Image.Image]           # MILAN-style: mask region kept, the rest dimmed
    crops: list[Image.Image]           # a crop around the mask region (the whole image if the mask is empty)


@dataclass
class Described:
    """A unit's description: the best phrase, its score, and the ranked alternatives."""

    layer: str
    unit: int
    description: str
    score: float
    backend: str
    candidates: list[tuple[str, float]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class Describer(Protocol):
    """Turns units' views into descriptions. ``prepare`` is called once per recording before ``describe``."""

    name: str

    def prepare(self, recording: "Recording") -> None: ...

    def describe(self, units: list[UnitViews]) -> list[Described]: ...
