"""Measure the text and colour base rates of the tagger's fixed background (``neuroscribe/describe/background.py``).

The background a unit is contrasted against is "a view of a random ImageNet photo". For ImageNet labels and their
WordNet hypernyms that rate follows from the class list (each class equally likely); for OCR text and colour names
it is measured here: the tagger (default settings: EfficientNet-Lite0, RapidOCR at ``ocr_side`` 448, colours) is run
on every photo shipped in ``neuroscribe/data/sample`` (500 ImageNet photos, train and val), each centre-cropped to
the model's 224 px input as the describer sees it, with no mask, and the mean weight of each text phrase and colour
name is printed (the weight the summariser's typicality uses: OCR confidence, colour pixel fraction; 0 where absent).

Usage: ``python tools/background_rates.py`` (a few minutes on 2 CPU cores); paste the dicts into background.py.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from PIL import Image

from neuroscribe.datasets.probe import load_image, sample_root
from neuroscribe.describe.background import COLOUR_FLOOR
from neuroscribe.describe.offline import CachedOCR, ImageNetClassifier
from neuroscribe.describe.tagger import BASIC_COLOURS, Tagger

TEXT = ("text", "letters", "digits", "number")


def _square(im: Image.Image, side: int = 224) -> Image.Image:
    s = side / min(im.size)
    im = im.resize((max(side, round(im.width * s)), max(side, round(im.height * s))), Image.BICUBIC)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return im.crop((left, top, left + side, top + side))


def main() -> None:
    paths = sorted(p for split in ("train", "val") for p in (sample_root() / split).glob("*/*.jpg"))
    classify = ImageNetClassifier("efficientnet-lite0", torch.device("cpu"))
    # min_side=224: the rates in background.py were measured reading the 224 px views unenlarged
    tagger = Tagger(classify, ocr=CachedOCR(min_side=224, det_limit_side_len=448, det_limit_type="max",
                                            use_angle_cls=False))
    total: dict[str, float] = defaultdict(float)
    words = 0.0
    for s in range(0, len(paths), 25):
        for view in tagger.tag([_square(load_image(p)) for p in paths[s:s + 25]]):
            for c in view:
                if c.source in ("text", "colour"):
                    total[c.phrase] += c.weight
                if c.phrase.startswith("the word "):
                    words += c.weight
    n = len(paths)
    print(f"{n} photos")
    print("TEXT_RATES =", {p: round(total[p] / n, 4) for p in TEXT})
    print("COLOUR_RATES =", {p: round(max(total[p] / n, COLOUR_FLOOR), 4) for p in BASIC_COLOURS})
    print("mean summed weight of 'the word X' phrases per photo:", round(words / n, 4))


if __name__ == "__main__":
    main()
