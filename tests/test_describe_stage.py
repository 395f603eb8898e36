"""Describe stage with the offline tagger on the real EfficientNet-Lite0 and real photos."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from neuroscribe.config import load_config
from neuroscribe.datasets.cues import TextCue, apply_cue
from neuroscribe.datasets.probe import load_image, sample_root
from neuroscribe.describe.describers import Described, UnitViews
from neuroscribe.record.recorder import record
from neuroscribe.describe.stage import describe


def job(out, **over):
    base = {"model": "efficientnet-lite0", "layers": ["_blocks.15", "_fc"], "out": str(out), "progress": False,
            "batch_size": 25, "workers": 0, "data": {"root": str(sample_root()), "split": "val"},
            "describe": {"units": 3, "faithfulness_images": 100, "verify": {"images": 8}}}
    base.update(over)
    return load_config(None, base)


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    out = tmp_path_factory.mktemp("desc") / "job"
    cfg = job(out)
    record(cfg)
    describe(cfg)
    return cfg, out


def test_exports_final_layer_check_and_faithfulness(described):
    import pandas as pd
    cfg, out = described
    df = pd.read_csv(out / "descriptions.csv")
    assert list(df.columns[:3]) == ["layer", "unit", "description"]
    # 3 units of each layer + the logit units of the 10 probe classes (tench is unit 0, already among the 3)
    assert len(df) == 3 + 3 + 9 and df["description"].str.len().min() > 0
    summary = json.loads((out / "describe.json").read_text())
    check = summary["final_layer_check"]
    assert check["layer"] == "_fc" and check["classes"] == 10
    # the logit units of the probe classes are named after their class (9 of 10 measured: church -> "monastery",
    # EfficientNet-Lite0 itself calls most of these church photos a monastery); the three below were "ball", "dog"
    # and "motor vehicle" while descriptions were contrasted against the probe set and hypernyms won
    assert check["accuracy"] >= 0.8, check
    per_class = check["per_class"]
    assert [per_class[c]["description"] for c in ("golf ball", "English springer", "garbage truck")] == \
        ["golf ball", "English springer", "garbage truck"], check
    tench = df[(df.layer == "_fc") & (df.unit == 0)].iloc[0]
    assert "tench" in tench.description or "fish" in tench.description
    # faithfulness is computed on real labelled images where a description names a probe class
    named = df.dropna(subset=["faithfulness_auc"])
    assert len(named) >= 3 and named.faithfulness_auc.max() > 0.9
    # every other unit says why it has none
    assert (df.faithfulness_auc.isna() == df.faithfulness_note.notna()).all()
    assert summary["faithfulness_units"] == len(named) and summary["faithfulness_notes"] == len(df) - len(named)
    assert (out / "gallery" / "index.html").is_file()
    assert pd.read_parquet(out / "descriptions.parquet").shape[0] == len(df)
    # every unit verified by experiment (or said why not), on the recording's model; counts in describe.json
    assert df.verify_status.isin(["confirmed", "not confirmed", "unverifiable"]).all()
    assert sum(summary["verification"].values()) == len(df)
    tried = df[df.verify_status != "unverifiable"]
    assert len(tried) >= len(df) // 2 and tried.verify_auc.between(0, 1).all() and tried.verify_kind.notna().all()
    # the response (the flag score) exported as verify.json holds it, for every tried unit
    ver = {(v["layer"], v["unit"]): v for v in
           json.loads(next((out / "describe").glob("*/verify.json")).read_text())["units"]}
    assert tried.verify_response.notna().all() and all(
        r.verify_response == pytest.approx(ver[(r.layer, r.unit)]["response"]) for r in tried.itertuples())
    assert df[df.verify_status == "unverifiable"].verify_response.isna().all()
    assert (tried.verify_response - tried.verify_effect).abs().max() > 1e-3  # its own figure, not the effect again
    for other in (pd.read_parquet(out / "descriptions.parquet"), pd.read_json(out / "descriptions.jsonl", lines=True)):
        assert other.verify_response.to_numpy() == pytest.approx(df.verify_response.to_numpy(), nan_ok=True)
    pages = "".join(p.read_text() for p in (out / "gallery").glob("layer-*.html"))
    assert pages.count("Verified by experiment") == len(df)


def test_resume_describes_only_missing_units(described):
    cfg, out = described
    log = next((out / "describe").glob("*/units.jsonl"))
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])  # drop one unit, tear the next line
    before = json.loads((out / "describe.json").read_text())
    describe(cfg)
    after = json.loads((out / "describe.json").read_text())
    assert after["units_described_this_run"] == 2 and after["units"] == before["units"]
    assert len(log.read_text().splitlines()) >= len(lines)
    describe(cfg)  # the torn line did not swallow the first row written after it: nothing is left to redo
    assert json.loads((out / "describe.json").read_text())["units_described_this_run"] == 0


def test_cache_mb_sizes_the_image_caches_and_keeps_the_descriptions(described, monkeypatch):
    from neuroscribe.describe import stage, views
    cfg, out = described
    opened = []
    real_open = stage.Recording.open
    monkeypatch.setattr(stage.Recording, "open", classmethod(lambda cls, j: opened.append(real_open(j)) or opened[-1]))
    before = (out / "descriptions.jsonl").read_text()
    small = cfg.model_copy(update={"describe": cfg.describe.model_copy(update={"cache_mb": 40.0})})
    describe(small)
    summary = json.loads((out / "describe.json").read_text())
    assert summary["units_described_this_run"] == 0  # a memo's size is not part of the descriptions' key
    assert (out / "descriptions.jsonl").read_text() == before
    rec = opened[0]
    assert rec.cache_bytes == 40 * 2**20
    assert views.image_cache(rec, size=224).maxsize == 40 * 2**20 // (3 * 224 * 224) == 278
    assert views.default_cache_size(224) == 3566 and views.default_cache_size(2048, 2**20) == 64
    with pytest.raises(Exception, match="cache_mb"):
        job(out, describe={"cache_mb": 0})


def test_text_unit_is_described_with_a_text_word(tmp_path):
    """Views whose masked region holds overlaid text: the tagger's description is a text word."""
    from neuroscribe.config import DescribeConfig
    from neuroscribe.describe.offline import TaggerDescriber
    import torch
    photos = sorted((sample_root() / "val").glob("*/*.jpg"))
    rng = random.Random(0)
    cue = TextCue(size=0.16, position="bottom-left")
    names = ["tench", "church", "parachute", "golf ball", "chain saw"]
    images, masks = [], []
    for i, p in enumerate(rng.sample(photos, 10)):
        im = load_image(p).resize((224, 224))
        images.append(apply_cue(im, cue, names[i % 5], rng))
        m = np.zeros((224, 224), bool)
        m[150:, :150] = True  # the unit fires on the bottom-left corner where the text is
        masks.append(m)
    uv = UnitViews("layer", 0, list(range(10)), [1.0] * 10, images, masks, images, images)
    out = TaggerDescriber(DescribeConfig(), torch.device("cpu")).describe([uv])[0]
    text_words = {"text", "letters", "word", "words", "digits", "number"}
    assert any(w in out.description.split() for w in text_words) or out.description.startswith("the word"), out


def test_faithfulness_uses_the_recordings_model_and_images(described):
    """The job's config may name another model or data now: faithfulness still measures the recorded model on the
    recording's own images, and refuses weights that changed since recording."""
    from neuroscribe.record.exemplars import Recording
    from neuroscribe.describe.stage import faithfulness
    cfg, out = described
    rec = Recording.open(out)
    rows = [Described("_fc", 0, "tench", 1.0, "tagger", [], {}),
            Described("_fc", 574, "golf ball", 1.0, "tagger", [], {}),
            Described("_fc", 1, "striped texture", 1.0, "tagger", [], {})]
    same = faithfulness(cfg, rec, rows)
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"spec": "torchvision:resnet18@none"}),
                                   "data": cfg.data.model_copy(update={"split": "train", "limit": 20})})
    assert faithfulness(other, rec, rows) == same
    assert same[("_fc", 0)]["auc"] > 0.9 and same[("_fc", 0)]["n_pos"] + same[("_fc", 0)]["n_neg"] == 100
    assert same[("_fc", 1)] == {"note": "the description names no probe class"}
    rec.meta["weights"] = "0" * 32
    with pytest.raises(ValueError, match="weights it was recorded with"):
        faithfulness(cfg, rec, rows)
