"""Training a classifier on data with a planted cue (the model whose units the later stages describe and edit)."""

from .classifier import TrainError, TrainResult, train_classifier

__all__ = ["TrainError", "TrainResult", "train_classifier"]
