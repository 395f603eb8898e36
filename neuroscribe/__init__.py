"""neuroscribe: describe every unit of a vision model in words, flag units tied to spurious cues, ablate them
and measure robustness on shifted test sets."""

from .config import ConfigError, JobConfig, load_config
from .models import LoadedModel, Preprocess, list_models, load_model, register_model

__version__ = "0.1.0"


def layers(spec: str):
    """The layer catalogue of a model spec: names, kinds, unit counts and output shapes."""
    from .hooks import layer_catalogue
    lm = load_model(spec)
    return layer_catalogue(lm.module, lm.preprocess.crop)


__all__ = ["ConfigError", "JobConfig", "LoadedModel", "Preprocess", "layers", "list_models", "load_config",
           "load_model", "register_model"]
