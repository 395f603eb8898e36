"""The record stage: one streaming pass over the probe set keeps, for every unit of the listed layers, its top-k
exemplars with their activation maps, its mask threshold (an exact or sketched quantile) and its mean.

``record(cfg)`` writes ``JOBDIR/record/<key>/`` (:mod:`.recorder`); :class:`Recording` reads it back
(:mod:`.exemplars`); the streaming statistics are in :mod:`.stats`."""

from .exemplars import Recording, RecordingError
from .recorder import record

__all__ = ["Recording", "RecordingError", "record"]
