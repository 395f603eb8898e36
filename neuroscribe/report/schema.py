"""The schema of a robustness report's results (validated before anything is written): every accuracy a fraction
with its CI, every variant, test set, unit and curve point named; :class:`ReportError` names each bad field."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ReportError", "RobustnessResults"]


class ReportError(ValueError):
    """The results dict does not follow the schema; the message names each offending field."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _frac(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"must be a fraction in [0, 1], got {v}" + (" (a percentage?)" if v <= 100 else ""))
    return v


class GroupAcc(_M):
    acc: float
    lo: float | None = None
    hi: float | None = None
    n: int = Field(ge=0)

    @field_validator("acc", "lo", "hi")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        return None if v is None else _frac(v)

    @model_validator(mode="after")
    def _ordered(self):
        if (self.lo is None) != (self.hi is None):
            raise ValueError("give both lo and hi, or neither")
        if self.lo is not None and not self.lo - 1e-9 <= self.acc <= self.hi + 1e-9:
            raise ValueError(f"need lo <= acc <= hi, got lo={self.lo}, acc={self.acc}, hi={self.hi}")
        return self


class WorstGroup(GroupAcc):
    name: str


class Acc(GroupAcc):
    correct: int | None = Field(None, ge=0)
    groups: dict[str, GroupAcc] | None = None
    worst_group: WorstGroup | None = None
    avg_group: GroupAcc | None = None  # the unweighted mean of the group accuracies (GroupDRO / DFR), with its CI


class Draw(_M):
    seed: int | None = None
    units: list[str] | None = None
    results: dict[str, Acc]


class Variant(_M):
    label: str | None = None
    description: str | None = None
    n_units: int = Field(ge=0)
    units: list[str] | None = None
    results: dict[str, Acc] | None = None
    draws: list[Draw] | None = None

    @model_validator(mode="after")
    def _has_results(self):
        if self.results is None and not self.draws:
            raise ValueError("needs 'results' (or 'draws' for a random control)")
        return self


class _SetInfo(_M):
    description: str
    n: int = Field(ge=0)
    groups: dict[str, int] | None = None


class TestSet(_SetInfo):
    in_distribution: bool = False


class Validation(_SetInfo):
    name: str = Field(min_length=1)


class ModelInfo(_M):
    spec: str
    arch: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    fingerprint: str | None = None
    seed: int | None = None
    notes: str | None = None


class JobInfo(_M):
    dir: str = Field(description="job directory; unit grid paths are relative to it")
    name: str | None = None
    created: str | None = None
    neuroscribe_version: str | None = None
    config: dict[str, Any] | None = None


class Ablation(_M):
    method: str
    flagged_by: str
    chosen_n: int = Field(ge=0)
    selection: str


class Flag(_M):
    reason: str
    score: float | None = None


class Unit(_M):
    layer: str
    unit: int = Field(ge=0)
    description: str
    flags: list[Flag] = Field(default_factory=list)
    scores: dict[str, float] | None = None
    grid: str | None = None
    variants: list[str] | None = None

    @field_validator("grid")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        if v is not None and (PurePosixPath(v).is_absolute() or ".." in PurePosixPath(v).parts or "\\" in v):
            raise ValueError(f"must be a path relative to job.dir without '..' (got {v!r})")
        return v


class Curve(_M):
    n_units: list[int] = Field(min_length=1)
    validation: list[float]
    test_sets: dict[str, list[float]] | None = None
    chosen_n: int = Field(ge=0)

    @model_validator(mode="after")
    def _lengths(self):
        for name, ys in [("validation", self.validation), *((f"test_sets.{k}", v) for k, v in
                                                             (self.test_sets or {}).items())]:
            if len(ys) != len(self.n_units):
                raise ValueError(f"{name} has {len(ys)} points but n_units has {len(self.n_units)}")
            for y in ys:
                _frac(y)
        return self


class Headline(_M):
    """The one number a reader looks for: the headline variant's gain over the base model on one shifted set (points,
    paired with the base model on the same images), beside the best and the mean random draw of the same N."""

    set: str
    variant: str
    metric: str = "accuracy"
    n_units: int = Field(ge=0)
    gain: float
    gain_lo: float | None = None
    gain_hi: float | None = None
    random_best: float | None = None
    random_mean: float | None = None
    random_draws: int = Field(0, ge=0)
    excludes_random_best: bool | None = None
    rule: str | None = None


class FlagSetQuality(_M):
    flagged: int = Field(ge=0)
    share: float = Field(ge=0, le=1)
    true_positives: int | None = Field(None, ge=0)
    precision: float | None = Field(None, ge=0, le=1)
    recall: float | None = Field(None, ge=0, le=1)
    auc: float | None = Field(None, ge=0, le=1)
    auc_units: int | None = Field(None, ge=0)


class PooledTruth(_M):
    """The same truth share taken over all units together instead of per layer (reported beside it)."""

    truth: int = Field(ge=0)
    truth_units: list[tuple[str, int]] | None = None
    truth_per_layer: dict[str, int] | None = None
    rule: str
    sets: dict[str, FlagSetQuality]


class FlagQuality(_M):
    """How well each flag set finds the units tied to the cue, against ground truth measured on a test set (after
    the fact: ``evaluation.json`` ``flag_quality``)."""

    test_set: str
    n_images: int = Field(ge=0)
    per_class: dict[str, int] | None = None
    units: int = Field(ge=0)
    truth: int = Field(ge=0)
    truth_units: list[tuple[str, int]] | None = None  # the ground-truth units themselves, [layer, unit]
    rule: str
    sets: dict[str, FlagSetQuality]
    pooled: PooledTruth | None = None  # planted cues: the top share over all units at once


class RobustnessResults(_M):
    """The validated results dict (see the module docstring)."""

    schema_: str = Field("neuroscribe.robustness/1", alias="schema", pattern=r"^neuroscribe\.robustness/1$")
    title: str | None = None
    model: ModelInfo
    job: JobInfo
    validation: Validation
    test_sets: dict[str, TestSet] = Field(min_length=1)
    ablation: Ablation
    variants: dict[str, Variant]
    curve: Curve | None = None
    units: list[Unit] = Field(default_factory=list)
    headline: Headline | None = None
    flag_quality: FlagQuality | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.headline is not None:
            if self.headline.set not in self.test_sets:
                raise ValueError(f"headline.set: unknown test set {self.headline.set!r}")
            if self.headline.variant not in self.variants:
                raise ValueError(f"headline.variant: unknown variant {self.headline.variant!r}")
        if self.curve is not None and self.curve.chosen_n != self.ablation.chosen_n:
            raise ValueError(f"curve.chosen_n ({self.curve.chosen_n}) differs from ablation.chosen_n "
                             f"({self.ablation.chosen_n})")
        if "base" not in self.variants:
            raise ValueError("variants.base: required (the unablated model)")
        if sum(t.in_distribution for t in self.test_sets.values()) > 1:
            raise ValueError("test_sets: at most one may have in_distribution: true")
        known = set(self.test_sets) | {self.validation.name}
        for name, v in self.variants.items():
            sets = [*(v.results or {})] + [k for d in v.draws or [] for k in d.results]
            bad = sorted(set(sets) - known)
            if bad:
                raise ValueError(f"variants.{name}: results for unknown sets {bad}; known: {sorted(known)}")
        rnd = self.variants.get("random")
        if rnd is not None and len(rnd.draws or []) < 5:
            raise ValueError(f"variants.random: needs at least 5 draws to show the spread "
                             f"(got {len(rnd.draws or [])})")
        return self


def _validate(results: dict) -> RobustnessResults:
    try:
        return RobustnessResults.model_validate(results)
    except ValidationError as e:
        lines = ["invalid robustness results:"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  - {loc}: {err['msg']}")
        raise ReportError("\n".join(lines)) from None
