"""Job configuration: one YAML file drives every stage.

The file is parsed into typed, validated pydantic models. Unknown keys, wrong types and out-of-range values
raise :class:`ConfigError`, whose message names the field (``record.k``) and what is allowed, before any work
starts. Every field can also be set from the command line with ``--set section.field=value`` (values are parsed
as YAML, so ``--set record.k=20`` gives an int and ``--set layers=[a,b]`` a list).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job configuration is invalid; the message names each offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which model to describe. ``spec`` is a registry name (``neuroscribe models`` lists them)."""

    spec: str = Field("efficientnet-lite0", min_length=1,
                      description="efficientnet-lite0 | torchvision:NAME[@WEIGHTS] | timm:NAME | "
                                  "open_clip:ARCH@PRETRAINED | hf:REPO_ID | checkpoint:PATH")
    arch: str | None = Field(None, description="for checkpoint:PATH state dicts: the spec that builds the "
                                               "architecture (e.g. torchvision:resnet18)")
    num_classes: int | None = Field(None, ge=1, description="output classes when building an architecture "
                                                             "for a checkpoint")
    allow_pickle: bool = Field(False, description="allow torch.load of arbitrary pickles (unsafe: only for "
                                                  "checkpoints you trust)")


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
    """The probe set: an ImageFolder tree or a CSV/JSONL manifest (columns path[,label][,group])."""

    root: Path | None = Field(None, description="image folder or manifest file; unset = the photo sample "
                                                "shipped inside the package")
    format: Literal["auto", "imagefolder", "csv", "jsonl"] = "auto"
    limit: int | None = Field(None, ge=1, description="use a seeded random subset of this many images")
    split: str | None = Field(None, description="sub-folder to use (e.g. train or val) when root has splits")


class RecordConfig(_Section):
    """Exemplar recording."""

    k: int = Field(15, ge=1, le=1000, description="top-activating images kept per unit")
    quantile: float = Field(0.99, gt=0.0, lt=1.0, description="per-unit activation quantile for masks")
    quantile_budget_mb: float = Field(512.0, gt=0,
                                      description="memory for exact quantiles; past it, a sampled sketch")
    checkpoint_every: int = Field(50, ge=1, description="batches between resumable state checkpoints")


class JobConfig(_Section):
    """A whole neuroscribe job."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    layers: list[str] = Field(default_factory=list, description="module names (neuroscribe layers SPEC)")
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    out: Path = Field(Path("jobs/default"), description="job directory: every stage reads and writes here")
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    batch_size: int = Field(32, ge=1, le=4096)
    workers: int = Field(2, ge=0, le=64, description="data-loading worker processes")
    progress: bool = True

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
        ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

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
        if isinstance(v, dict) and isinstance(res.get(k), dict):
            res[k] = _merge(res[k], v)
        else:
            res[k] = v
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
