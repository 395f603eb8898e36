"""Channels-last (B, H, W, C) layers: recorded and ablated on the channel (last) axis, as a real timm Swin lays
its stages out, checked against an explicit permute of the hooked output; an ambiguous layout is refused."""
import json
import warnings

import pytest
import torch

from neuroscribe import models
from neuroscribe.ablate.edit import ablated, ablation_edits, permanent_edit
from neuroscribe.config import load_config
from neuroscribe.datasets.probe import load_image, sample_root
from neuroscribe.record.exemplars import Recording
from neuroscribe.record.recorder import record
from neuroscribe.hooks import layer_catalogue, trace

SIZE = 64  # input side: Swin stage 0 is a 16 x 16 grid of patches


def swin(embed_dim: int) -> torch.nn.Module:
    """A real timm Swin (random weights), small: stage 0 outputs (B, 16, 16, embed_dim), channels-last."""
    import timm
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=SIZE, embed_dim=embed_dim,
                             depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, num_classes=10).eval()


@pytest.fixture(scope="module")
def model():
    return swin(24)


@pytest.fixture
def registered(monkeypatch):
    """``test-swin-D``: the small Swin with embed_dim D, as a model spec the record stage loads."""
    def add(embed_dim: int) -> str:
        name = f"test-swin-{embed_dim}"
        pre = models.Preprocess(resize=SIZE, crop=SIZE)
        monkeypatch.setitem(models._REGISTRY, name, lambda **_: models.LoadedModel(name, swin(embed_dim), pre))
        return name
    return add


def job(out, spec, layers, **over):
    return load_config(None, {"model": spec, "layers": layers, "out": str(out), "progress": False, "device": "cpu",
                              "batch_size": 12, "workers": 0, "record": {"k": 4},
                              "data": {"root": str(sample_root()), "split": "val", "limit": 12}, **over})


def _hooked(m, rec: Recording, layers):
    """Every probe image through ``m`` in one batch (the recording's batch), the layers' outputs hooked."""
    tf = rec.preprocess.transform()
    x = torch.stack([tf(load_image(p)) for p in rec.image_paths])
    with torch.no_grad(), trace(m, retain=layers) as tr:
        m(x)
    return tr.outputs


def test_record_nhwc_layers_match_explicit_permute(registered, model, tmp_path):
    nhwc = ["layers.0", "layers.1.blocks.0"]  # a stage (timm feature_info gives its width) and a bare block
    rec = Recording(record(job(tmp_path / "j", registered(24), nhwc + ["layers.0.blocks.0.mlp", "head.fc"])))
    outs = _hooked(model, rec, nhwc)
    for name in nhwc:
        ref = outs[name].permute(0, 3, 1, 2)  # (B, C, H, W)
        meta, t = rec.meta["layers"][name], rec.tensors(name)
        assert meta["layout"] == "nhwc" and meta["units"] == ref.shape[1]
        assert meta["map_shape"] == list(ref.shape[2:])
        top = ref.amax(dim=(2, 3)).T.topk(4, dim=1)  # per unit: its 4 highest spatial maxima over the images
        assert torch.allclose(t["scores"], top.values, rtol=1e-4, atol=1e-5), name
        assert torch.equal(t["ids"], top.indices), name
        u = torch.arange(ref.shape[1])
        assert torch.allclose(t["maps"][:, 0].float(), ref[t["ids"][:, 0], u].half().float(), rtol=1e-2, atol=1e-2)
        assert torch.allclose(t["mean"], ref.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert rec.meta["layers"]["layers.0.blocks.0.mlp"]["kind"] == "tokens"  # tokens and flat: as before
    assert rec.meta["layers"]["layers.0.blocks.0.mlp"]["layout"] is None and rec.units("layers.0.blocks.0.mlp") == 24
    assert rec.meta["layers"]["head.fc"]["kind"] == "flat" and rec.units("head.fc") == 10
    meta = json.loads((rec.path / "meta.json").read_text())
    assert {n: meta["layers"][n]["layout"] for n in nhwc} == {n: "nhwc" for n in nhwc}


def _diff_channels(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Last-axis channels where two (B, H, W, C) outputs differ."""
    return torch.nonzero((a != b).flatten(0, 2).any(0)).flatten().tolist()


def test_ablate_nhwc_edits_only_the_channel(model):
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    layers = ["layers.0", "layers.1.blocks.0"]
    with torch.no_grad(), trace(model, retain=layers) as tr:
        base_logits = model(x)
    base = dict(tr.outputs)
    with torch.no_grad(), ablated(model, {"layers.0": [5]}, retain=["layers.0"]) as tr:
        model(x)
    assert _diff_channels(tr["layers.0"], base["layers.0"]) == [5] and (tr["layers.0"][..., 5] == 0).all()
    means = {"layers.1.blocks.0": torch.linspace(-1, 1, 48)}  # many units, mean ablation, a block without width
    units = [1, 17, 40]  # 40: beyond H and W, a unit only the channel axis has
    with torch.no_grad(), ablated(model, {"layers.1.blocks.0": units}, "mean", means,
                                  retain=["layers.1.blocks.0"]) as tr:
        model(x)
    out = tr["layers.1.blocks.0"]
    assert _diff_channels(out, base["layers.1.blocks.0"]) == units
    assert torch.equal(out[..., units], means["layers.1.blocks.0"][units].expand_as(out[..., units]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stage has no weights to edit: a permanent hook
        edited = permanent_edit(model, {"layers.0": [5]})
    with torch.no_grad(), trace(model, edit=ablation_edits(model, {"layers.0": [5]})):
        hooked = model(x)
    with torch.no_grad():
        assert torch.equal(edited(x), hooked) and not torch.equal(hooked, base_logits)


def test_catalogue_counts_channels_last_units(model):
    rows = {r.name: r for r in layer_catalogue(model, SIZE)}
    assert (rows["layers.0"].layout, rows["layers.0"].units) == ("nhwc", 24)
    assert (rows["patch_embed.proj"].layout, rows["patch_embed.proj"].units) == ("nchw", 24)  # the Conv2d
    assert rows["layers.1.blocks.0"].units == 48 and rows["head.fc"].layout is None


def test_ambiguous_layout_is_refused_naming_the_layer(registered, tmp_path):
    spec = registered(16)  # stage 0 is (B, 16, 16, 16): H == W == C, either reading fits
    with pytest.raises(ValueError, match=r"'layers\.0'.*channels-first.*channels-last.*layouts: \{layers\.0: nhwc\}") \
            as e:
        record(job(tmp_path / "j", spec, ["layers.0"]))
    assert type(e.value).__name__ == "LayoutError"
    m = swin(16)
    edits = ablation_edits(m, {"layers.0.blocks.0": [3]})
    with pytest.raises(ValueError, match=r"'layers\.0\.blocks\.0'.*declare"), torch.no_grad(), \
            trace(m, edit=edits):
        m(torch.randn(1, 3, SIZE, SIZE))
    # declared: recorded and ablated on the last axis
    rec = Recording(record(job(tmp_path / "k", spec, ["layers.0"], layouts={"layers.0": "nhwc"})))
    assert rec.layout("layers.0") == "nhwc" and rec.layouts == {"layers.0": "nhwc"}
    from neuroscribe.hooks import declare_layouts
    declare_layouts(m, rec.layouts)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad(), trace(m, retain=["layers.0"]) as tr:
        m(x)
    with torch.no_grad(), ablated(m, {"layers.0": [3]}, retain=["layers.0"]) as ab:
        m(x)
    assert _diff_channels(ab["layers.0"], tr["layers.0"]) == [3]


class _Blocks(torch.nn.Module):
    """A stride-4 stem with 16 channels, then a bare block that keeps NCHW and one that turns it to NHWC: at 64 px
    both outputs are 16 x 16 x 16, so the shape alone cannot tell them apart."""

    class Keep(torch.nn.Module):
        def forward(self, x):
            return x * 1.0

    class ToLast(torch.nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).contiguous()

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.first, self.last = self.Keep(), self.ToLast()
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.first(self.stem(x))
        return self.head(self.last(x).mean((1, 2)))


def test_square_layouts_told_apart_by_a_second_input_size(monkeypatch, tmp_path):
    pre = models.Preprocess(resize=SIZE, crop=SIZE)
    net = _Blocks().eval()
    monkeypatch.setitem(models._REGISTRY, "test-square", lambda **_: models.LoadedModel("test-square", net, pre))
    rec = Recording(record(job(tmp_path / "j", "test-square", ["first", "last"])))
    assert rec.layouts == {"first": "nchw", "last": "nhwc"}
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), trace(net, retain=["first", "last"]) as tr:
        net(x)
    assert torch.equal(tr["first"], tr["last"].permute(0, 3, 1, 2))  # one map, two layouts
    maps = rec.tensors("last")["maps"]  # the exemplars' maps: the same units on both layers
    assert torch.equal(maps, rec.tensors("first")["maps"])
    from neuroscribe.hooks import declare_layouts
    m = declare_layouts(_Blocks().eval(), rec.layouts)
    with torch.no_grad(), ablated(m, {"last": [5]}, retain=["last"]) as ab:
        m(x)
    assert _diff_channels(ab["last"], tr["last"]) == [5]


def test_efficientnet_block_with_as_many_channels_as_pixels_records(tmp_path, caplog):
    """EfficientNet-Lite0 at 96 px: ``_blocks.1`` outputs 24 channels on a 24 x 24 grid (was a LayoutError); 96 px
    is under half the model's native 224, which the log says."""
    cfg = job(tmp_path / "e", "efficientnet-lite0", ["_blocks.1", "_blocks.3"],
              preprocess={"resize": 96, "crop": 96})
    with caplog.at_level("WARNING", logger="neuroscribe.record"):
        rec = Recording(record(cfg))
    assert "at 96 px, under half of its native input (224 px)" in caplog.text
    assert rec.layouts == {"_blocks.1": "nchw", "_blocks.3": "nchw"}
    assert rec.meta["layers"]["_blocks.1"]["map_shape"] == [24, 24] and rec.units("_blocks.1") == 24
