"""Spurious-cue configs and the code that draws them onto images.

Five cue kinds, each a validated pydantic model discriminated by ``kind``:

* :class:`TextCue` (``kind='text'``): a word (usually a class name) written in a corner, the
  centre or anywhere (``position='random'``), as in MILAN's spurious-text experiment (Hernandez et
  al., ICLR 2022, section 7);
  ``opacity < 1`` makes it a faint overlay.
* :class:`WatermarkCue` (``kind='watermark'``): a fixed, semi-transparent text over the centre
  of the image, in the style of ImageNet-W (Li et al., CVPR 2023, the "iStock" watermark).
* :class:`ColourCue` (``kind='colour'``): the whole image tinted toward a class colour.
* :class:`PatchCue` (``kind='patch'``): a solid square of a class colour.
* :class:`BackgroundCue` (``kind='background'``): a class-coloured frame around the image.
  This is only a cheap *proxy* for a background cue (e.g. Waterbirds' land/water backgrounds):
  it changes the pixels at the image border, not a segmented background.

Class-coloured cues take their colours from :func:`class_colour`, a fixed palette that is the
same in every run and gives every class index a different colour.

:func:`apply_cue` draws one cue; :func:`render_cue` also returns the box it drew into.
"""

from __future__ import annotations

import colorsys
import functools
import random
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

from PIL import Image, ImageColor, ImageDraw, ImageFont
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, field_validator

__all__ = [
    "RGB", "Position", "TextCue", "WatermarkCue", "ColourCue", "PatchCue", "BackgroundCue", "Cue",
    "CLASS_PALETTE", "DEFAULT_FONT", "RenderedCue", "parse_cue", "cue_uses_class", "class_colour",
    "load_font", "render_cue", "apply_cue",
]

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]
Position = Literal["top-left", "top-right", "bottom-left", "bottom-right", "center", "random-corner", "random"]
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")

#: Font used when a cue's ``font`` is None (if this file exists; else Pillow's bundled font).
DEFAULT_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")

#: The first 20 class colours: Sasha Trubetskoy's "20 simple, distinct colours" (in his order:
#: red, green, yellow, blue, orange, purple, cyan, magenta, lime, pink, teal, lavender, brown,
#: beige, maroon, mint, olive, apricot, navy, grey). Class ``k >= 20`` gets a colour from a
#: golden-ratio walk around the HSV hue circle (see :func:`class_colour`).
CLASS_PALETTE: tuple[RGB, ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49),
    (145, 30, 180), (66, 212, 244), (240, 50, 230), (191, 239, 69), (250, 190, 212),
    (70, 153, 144), (220, 190, 255), (154, 99, 36), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 216, 177), (0, 0, 117), (169, 169, 169),
)


def _parse_colour(value: Any) -> RGB:
    """Turn a colour name, ``'#rrggbb'`` string or ``(r, g, b)`` sequence into an RGB triple."""
    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(
                f"unknown colour {value!r}; use a CSS/PIL colour name ('white'), '#rrggbb' "
                "or an (r, g, b) triple of ints in 0..255") from None
        return (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value):
        return (int(value[0]), int(value[1]), int(value[2]))
    raise ValueError(f"invalid colour {value!r}; expected a colour name, '#rrggbb' "
                     "or an (r, g, b) triple of ints in 0..255")


Colour = Annotated[RGB, BeforeValidator(_parse_colour)]


class _CueBase(BaseModel):
    """Shared pydantic settings: unknown fields are errors, models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class _FontMixin(_CueBase):
    font: str | None = Field(None, description="Path to a TrueType/OpenType font; None = DEFAULT_FONT.")

    @field_validator("font")
    @classmethod
    def _font_loads(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not Path(value).is_file():
            raise ValueError(f"font file not found: {value!r}")
        try:
            ImageFont.truetype(value, 12)
        except OSError as exc:
            raise ValueError(f"font file {value!r} could not be loaded by Pillow: {exc}") from None
        return value


class TextCue(_FontMixin):
    """Write a word (the token, usually a class name) onto the image.

    Sizes are fractions so one config works at any resolution: ``size`` is the font size as a
    share of the image height, ``margin`` the gap to the image edge as a share of the shorter
    side, ``padding``/``stroke`` shares of the font size. With ``fit`` the font shrinks until the
    text (and its box) fits inside the margins.
    """

    kind: Literal["text"] = "text"
    size: float = Field(0.12, gt=0, le=1, description="Font size as a fraction of image height.")
    position: Position = "bottom-left"
    colour: Colour = (255, 255, 255)
    background: Colour | None = Field((0, 0, 0), description="Box behind the text; None = no box.")
    padding: float = Field(0.2, ge=0, le=2, description="Box padding as a fraction of font size.")
    stroke: float = Field(0.0, ge=0, le=0.5, description="Outline width as a fraction of font size.")
    stroke_colour: Colour = (0, 0, 0)
    margin: float = Field(0.02, ge=0, lt=0.5, description="Gap to the edge, fraction of the shorter side.")
    fit: bool = True
    opacity: float = Field(1.0, gt=0, le=1, description="Opacity of the text and its box (1 = opaque).")


class WatermarkCue(_FontMixin):
    """ImageNet-W-style watermark: a fixed, semi-transparent text over the image centre.

    The token passed to :func:`apply_cue` is ignored: every watermarked image carries ``text``.
    With ``tile`` the (rotated) text is repeated over the whole image, centred on the middle,
    with gaps of ``spacing`` times the tile size.
    """

    kind: Literal["watermark"] = "watermark"
    text: str = Field("iStock", min_length=1)
    size: float = Field(0.2, gt=0, le=1, description="Font size as a fraction of image height.")
    colour: Colour = (255, 255, 255)
    opacity: float = Field(0.5, gt=0, le=1)
    rotation: float = Field(0.0, ge=-180, le=180, description="Degrees, counter-clockwise.")
    tile: bool = False
    spacing: float = Field(0.5, ge=0, le=5)


class ColourCue(_CueBase):
    """Tint the whole image toward the class colour: ``blend(image, colour, alpha)``."""

    kind: Literal["colour"] = "colour"
    alpha: float = Field(0.3, gt=0, le=1, description="Blend weight of the class colour.")


class PatchCue(_CueBase):
    """A solid square of the class colour; ``size`` and ``margin`` are fractions of the shorter side."""

    kind: Literal["patch"] = "patch"
    size: float = Field(0.15, gt=0, le=1)
    position: Position = "top-left"
    margin: float = Field(0.02, ge=0, lt=0.5)


class BackgroundCue(_CueBase):
    """A class-coloured frame of ``width`` (fraction of the shorter side) around the image.

    A cheap *proxy* for a background cue: it recolours a border, not a segmented background.
    """

    kind: Literal["background"] = "background"
    width: float = Field(0.08, gt=0, lt=0.5)


Cue = Annotated[Union[TextCue, WatermarkCue, ColourCue, PatchCue, BackgroundCue], Field(discriminator="kind")]
_CUE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Cue)


def parse_cue(value: Any) -> TextCue | WatermarkCue | ColourCue | PatchCue | BackgroundCue:
    """Validate a cue from a dict (e.g. loaded from YAML) or pass a cue model through.

    Raises ``pydantic.ValidationError`` (a ``ValueError``) naming the offending field.
    """
    return _CUE_ADAPTER.validate_python(value)


def cue_uses_class(cue: Any) -> bool:
    """True for cues whose token is a class index drawn as a class colour."""
    return isinstance(cue, (ColourCue, PatchCue, BackgroundCue))


def describe_cue(cue: Any, correlation: str) -> str:
    """How a cue ties images to classes, in words for reports: "the name of a random WRONG class written on it",
    "a patch in the colour of the true class", "a watermark (it names no class)"."""
    cue = parse_cue(cue)
    whose = {"wrong": "a random WRONG class", "match": "the true class", "random": "a random class"}.get(
        correlation, "no class")
    if isinstance(cue, TextCue):
        return f"the name of {whose} written on it"
    if isinstance(cue, WatermarkCue):
        return "a watermark (it names no class)"
    return f"{'a' if cue.kind != 'background' else 'the'} {cue.kind} in the colour of {whose}"


_PALETTE: list[RGB] = list(CLASS_PALETTE)
_PALETTE_SEEN: set[RGB] = set(CLASS_PALETTE)
_PALETTE_STEP = [0]


def _extend_palette(n: int) -> None:
    """Grow the cached palette to ``n`` colours with a golden-ratio hue walk, skipping repeats."""
    while len(_PALETTE) < n:
        j = _PALETTE_STEP[0]
        _PALETTE_STEP[0] += 1
        hue = (j * 0.6180339887498949) % 1.0
        sat = (0.9, 0.6, 0.75)[j % 3]
        val = (0.95, 0.7, 0.5, 0.85)[(j // 3) % 4]
        r, g, b = (int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        if (r, g, b) not in _PALETTE_SEEN:
            _PALETTE_SEEN.add((r, g, b))
            _PALETTE.append((r, g, b))


def class_colour(k: int) -> RGB:
    """The fixed colour of class ``k`` (``CLASS_PALETTE[k]`` for k < 20); distinct for every k."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"class index must be a non-negative int, got {k!r}")
    _extend_palette(k + 1)
    return _PALETTE[k]


@functools.lru_cache(maxsize=64)
def load_font(path: str | None, size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Load ``path`` (or the default font) at ``size_px`` pixels; cached."""
    size_px = max(1, int(size_px))
    if path is not None:
        return ImageFont.truetype(path, size_px)
    if DEFAULT_FONT.is_file():
        return ImageFont.truetype(str(DEFAULT_FONT), size_px)
    return ImageFont.load_default(size=size_px)


class RenderedCue(NamedTuple):
    """A cued image and the box ``(x0, y0, x1, y1)``, exclusive end, that bounds every changed pixel."""

    image: Image.Image
    box: Box


def _place(width: int, height: int, w: int, h: int, position: str, margin: int,
           rng: random.Random) -> tuple[int, int]:
    if position == "random":  # anywhere inside the margins; one draw per axis, so a redraw at another
        # resolution with the same rng puts the cue at the same relative place
        u, v = rng.random(), rng.random()
        return (margin + int(u * max(0, width - 2 * margin - w)),
                margin + int(v * max(0, height - 2 * margin - h)))
    if position == "random-corner":
        position = rng.choice(_CORNERS)
    if position == "center":
        return (width - w) // 2, (height - h) // 2
    x = margin if position.endswith("left") else width - margin - w
    y = margin if position.startswith("top") else height - margin - h
    return x, y


def _clip(box: tuple[float, float, float, float], width: int, height: int) -> Box:
    x0, y0, x1, y1 = (int(v) for v in box)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def _draw_text(img: Image.Image, cue: TextCue, text: str, rng: random.Random) -> RenderedCue:
    if cue.opacity < 1:  # drawn opaque on a transparent layer, then composited at ``opacity``
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        box = _draw_text(layer, cue.model_copy(update={"opacity": 1.0}), text, rng).box
        layer.putalpha(layer.getchannel("A").point(lambda a: int(round(a * cue.opacity))))
        return RenderedCue(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"), box)
    width, height = img.size
    margin = int(round(cue.margin * min(width, height)))
    px = max(1, int(round(cue.size * height)))
    draw = ImageDraw.Draw(img)
    while True:
        font = load_font(cue.font, px)
        stroke = int(round(cue.stroke * px))
        pad = int(round(cue.padding * px)) if cue.background is not None else 0
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        room_w, room_h = width - 2 * margin, height - 2 * margin
        if not cue.fit or px <= 6 or (w <= room_w and h <= room_h):
            break
        px = max(6, min(px - 1, int(px * min(room_w / w, room_h / h))))
    x, y = _place(width, height, w, h, cue.position, margin, rng)
    if cue.background is not None:
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=cue.background)
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=cue.colour,
              stroke_width=stroke, stroke_fill=cue.stroke_colour)
    return RenderedCue(img, _clip((x, y, x + w, y + h), width, height))


def _composite_at(layer: Image.Image, tile: Image.Image, x: int, y: int) -> None:
    """Alpha-composite ``tile`` onto ``layer`` at (x, y), clipping to the layer."""
    sx0, sy0 = max(0, -x), max(0, -y)
    sx1, sy1 = min(tile.width, layer.width - x), min(tile.height, layer.height - y)
    if sx1 > sx0 and sy1 > sy0:
        layer.alpha_composite(tile, dest=(x + sx0, y + sy0), source=(sx0, sy0, sx1, sy1))


def _draw_watermark(img: Image.Image, cue: WatermarkCue) -> RenderedCue:
    width, height = img.size
    font = load_font(cue.font, max(1, int(round(cue.size * height))))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), cue.text, font=font)
    tile = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((-left, -top), cue.text, font=font,
                              fill=(*cue.colour, int(round(255 * cue.opacity))))
    if cue.rotation:
        tile = tile.rotate(cue.rotation, resample=Image.Resampling.BICUBIC, expand=True)
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    x_c, y_c = (width - tile.width) // 2, (height - tile.height) // 2
    if cue.tile:
        step_x = max(1, int(round(tile.width * (1 + cue.spacing))))
        step_y = max(1, int(round(tile.height * (1 + cue.spacing))))
        nx, ny = width // step_x + 2, height // step_y + 2
        for iy in range(-ny, ny + 1):
            for ix in range(-nx, nx + 1):
                _composite_at(layer, tile, x_c + ix * step_x, y_c + iy * step_y)
    else:
        _composite_at(layer, tile, x_c, y_c)
    box = layer.getchannel("A").getbbox() or (0, 0, 0, 0)
    out = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    return RenderedCue(out, _clip(box, width, height))


def _check_class_token(cue: Any, token: str | int) -> int:
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise TypeError(f"a {cue.kind!r} cue needs a non-negative class index as its token, got {token!r}")
    return token


def render_cue(img: Image.Image, cue: Any, token: str | int, rng: random.Random) -> RenderedCue:
    """Draw ``cue`` on a copy of ``img`` (converted to RGB) and return it with the changed box.

    ``token`` is the text to write for a :class:`TextCue`, ignored for a :class:`WatermarkCue`,
    and the class index (coloured via :func:`class_colour`) for colour/patch/background cues.
    ``rng`` is only consumed by random choices (``position='random-corner'`` or ``'random'``).
    """
    cue = parse_cue(cue)
    out = img.convert("RGB") if img.mode != "RGB" else img.copy()
    width, height = out.size
    if isinstance(cue, TextCue):
        if not isinstance(token, str) or not token.strip():
            raise TypeError(f"a 'text' cue needs a non-empty string token (the text to write), "
                            f"got {token!r}; map class indices to class names first")
        return _draw_text(out, cue, token, rng)
    if isinstance(cue, WatermarkCue):
        return _draw_watermark(out, cue)
    colour = class_colour(_check_class_token(cue, token))
    if isinstance(cue, ColourCue):
        tinted = Image.blend(out, Image.new("RGB", out.size, colour), cue.alpha)
        return RenderedCue(tinted, (0, 0, width, height))
    draw = ImageDraw.Draw(out)
    short = min(width, height)
    if isinstance(cue, PatchCue):
        side = max(1, int(round(cue.size * short)))
        margin = int(round(cue.margin * short))
        x, y = _place(width, height, side, side, cue.position, margin, rng)
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=colour)
        return RenderedCue(out, _clip((x, y, x + side, y + side), width, height))
    frame = max(1, int(round(cue.width * short)))
    for rect in ((0, 0, width - 1, frame - 1), (0, height - frame, width - 1, height - 1),
                 (0, 0, frame - 1, height - 1), (width - frame, 0, width - 1, height - 1)):
        draw.rectangle(rect, fill=colour)
    return RenderedCue(out, (0, 0, width, height))


def apply_cue(img: Image.Image, cue: Any, token: str | int, rng: random.Random) -> Image.Image:
    """Return a copy of ``img`` with ``cue`` drawn for ``token`` (see :func:`render_cue`)."""
    return render_cue(img, cue, token, rng).image
