"""The model's field of view of a photo, at any resolution: what the describer (and a person) is shown.

A model sees the box its resize and centre crop (:meth:`~neuroscribe.models.Preprocess.geometry`) cut from the
source photo, at ``crop`` px. The describer sees the same box, but cut from the source file at its own resolution,
the *view size* (:func:`view_size`: ``describe.view_size``, by default ``max(224, model crop)``, the input size of
the tagger's classifier, of the OCR reader and of the gallery): for a model run at 64 px a caption or a faint
watermark that a person reads in the photo is a few blurred pixels in the model's input, but legible in a 224 px
view resampled once from the source (:class:`ViewGeometry`). The model's own input is never changed by this.

It lives with the datasets (not the describer) because the probe writer (:func:`neuroscribe.pipeline.with_probe`)
draws cues at the view size and the recording (:meth:`~neuroscribe.record.exemplars.Recording.image`) reads views
back with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..models import Preprocess

__all__ = ["MIN_VIEW_SIZE", "ViewGeometry", "model_box", "view_size"]

MIN_VIEW_SIZE = 224  # the tagger's classifier, the OCR reader and the gallery look at >= 224 px


def view_size(crop: int, requested: int | None = None) -> int:
    """Side of the views of a model with input ``crop``: ``requested`` (``describe.view_size``) if set, else
    ``max(MIN_VIEW_SIZE, crop)``."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"view size must be a positive number of pixels; got {requested}")
        return int(requested)
    return max(MIN_VIEW_SIZE, int(crop))


def model_box(pre: Preprocess, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The model's crop of a ``width`` x ``height`` source as a box in source pixels (PIL convention).

    It is torchvision's arithmetic of ``Resize(pre.resize)`` (shorter side to ``resize``, the longer one
    truncated) and ``CenterCrop(pre.crop)`` (offsets rounded), mapped back through the resize's scale on each
    axis. None when the crop is larger than the resized image (the model's input is then padded).
    """
    short, long = min(width, height), max(width, height)
    new_long = int(pre.resize * long / short)
    new_w, new_h = (pre.resize, new_long) if width <= height else (new_long, pre.resize)
    if pre.crop > new_w or pre.crop > new_h:
        return None
    top, left = int(round((new_h - pre.crop) / 2.0)), int(round((new_w - pre.crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + pre.crop) * sx, (top + pre.crop) * sy


@dataclass(frozen=True)
class ViewGeometry:
    """PIL -> PIL: the model's field of view of a source image, resampled once to ``size`` x ``size``.

    The box is :func:`model_box` (what the model's resize and centre crop keep), resampled with the model's
    interpolation straight from the source file, so detail finer than the model's input survives. At
    ``size == pre.crop`` it is the model's own geometry (:meth:`Preprocess.geometry`), pixel for pixel.
    """

    pre: Preprocess
    size: int

    def __call__(self, im: Image.Image) -> Image.Image:
        if self.size == self.pre.crop:
            return self.pre.geometry()(im)
        resample = Image.Resampling[self.pre.interpolation.split("-")[0].upper()]  # nearest-exact: nearest
        box = model_box(self.pre, im.width, im.height)
        if box is None:  # a padded crop: the model's pixels, enlarged
            return self.pre.geometry()(im).resize((self.size, self.size), resample)
        return im.convert("RGB").resize((self.size, self.size), resample, box=box)
