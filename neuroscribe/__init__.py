"""neuroscribe: describe every unit of a vision model in words, flag units tied to spurious cues, ablate them
and measure robustness on shifted test sets."""

from .config import ConfigError, JobConfig, load_config
from .models import LoadedModel, Preprocess, list_models, load_model, register_model

__version__ = "0.1.0"


def record(config, **overrides):
    """Run the record stage for a :class:`JobConfig` (or a YAML path); returns the recording directory."""
    from .describe.record import record as _record
    cfg = config if isinstance(config, JobConfig) else load_config(config, overrides or None)
    return _record(cfg)


def layers(spec: str):
    """The layer catalogue of a model spec: names, kinds, unit counts and output shapes."""
    from .hooks import layer_catalogue
    lm = load_model(spec)
    return layer_catalogue(lm.module, lm.preprocess.crop)


__all__ = ["ConfigError", "JobConfig", "LoadedModel", "Preprocess", "layers", "list_models", "load_config",
           "load_model", "record", "register_model"]
