"""The one hook mechanism: retain and edit, names checked first, token grids reshaped correctly."""
import re

import pytest
import torch
from torch import nn

from neuroscribe.hooks import UnknownLayerError, layer_catalogue, prefix_tokens, resolve_layers, run, trace, unit_view


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def test_retain_and_edit_same_mechanism():
    m = Tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    with trace(m, retain=["act", "fc"]) as tr:
        y = m(x)
    assert tr["act"].shape == (2, 4, 8, 8) and torch.equal(tr["fc"], y)

    def zero_unit(t):
        t = t.clone()
        t[:, 1] = 0
        return t
    with trace(m, retain=["act"], edit={"act": zero_unit}) as tr:
        m(x)
    assert torch.all(tr["act"][:, 1] == 0)  # retained output is after the edit
    with torch.no_grad():
        m.conv.weight[1] = 0
        m.conv.bias[1] = 0
    # hooks are removed after the block
    assert not m.act._forward_hooks


def test_unknown_layer_names_nearest_and_attaches_nothing():
    m = Tiny()
    with pytest.raises(UnknownLayerError) as e:
        with trace(m, retain=["act", "convv"]):
            pass
    assert "'conv'" in str(e.value) and "neuroscribe layers" in str(e.value)
    assert not m.act._forward_hooks


def test_stop_skips_the_rest():
    m = Tiny()
    calls = []
    m.fc.register_forward_hook(lambda *a: calls.append(1))
    with trace(m, retain=["act"], stop=True) as tr:
        out = run(m, torch.randn(1, 3, 8, 8))
    assert out is None and "act" in tr and not calls


def test_vit_tokens_reshape_matches_explicit_grid():
    b, g, d, reg = 2, 5, 7, 4
    grid = torch.randn(b, d, g, g)
    patches = grid.flatten(2).transpose(1, 2)  # row-major patch order, as ViTs lay them out
    cls = torch.randn(b, 1, d)
    regs = torch.randn(b, reg, d)
    toks = torch.cat([cls, regs, patches], 1)  # CLS + registers + patches
    assert torch.equal(unit_view(toks, n_prefix=1 + reg), grid)
    assert prefix_tokens(None, 1 + g * g) == 1
    assert torch.equal(unit_view(torch.cat([cls, patches], 1)), grid)  # inferred prefix of 1, no off-by-one
    assert unit_view(torch.randn(b, d)).shape == (b, d, 1, 1)


def test_real_torchvision_vit_layer_grid():
    from torchvision.models.vision_transformer import VisionTransformer
    m = VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16,
                          mlp_dim=32).eval()
    x = torch.randn(1, 3, 64, 64)
    with trace(m, retain=["encoder.layers.encoder_layer_1"]) as tr:
        m(x)
    t = tr["encoder.layers.encoder_layer_1"]
    assert t.shape == (1, 17, 16)
    v = unit_view(t)
    assert v.shape == (1, 16, 4, 4) and torch.equal(v[0, :, 0, 1], t[0, 2])  # token 2 = row 0, col 1


def test_catalogue_counts_units_and_calls():
    rows = {r.name: r for r in layer_catalogue(Tiny(), 8)}
    assert rows["conv"].units == 4 and rows["conv"].kind == "conv" and rows["fc"].kind == "flat"
    assert rows["act"].calls == 1


def test_retained_output_survives_inplace_ops_later_in_the_model():
    from neuroscribe.models import load_model
    m = load_model("torchvision:resnet18@none").module
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    h = m.layer1[0].bn1.register_forward_hook(lambda _m, _i, o: seen.update(bn1=o.clone()))  # returns None
    with torch.no_grad(), trace(m, retain=["layer1.0.bn1"]) as tr:
        m(x)
    h.remove()
    assert tr["layer1.0.bn1"].min() < 0  # BN output, not the ReLU(inplace) that follows it
    assert torch.equal(tr["layer1.0.bn1"], seen["bn1"])


def test_unknown_layer_in_another_naming_still_lists_real_layers():
    import ast
    m = Tiny()
    with pytest.raises(UnknownLayerError) as e:
        resolve_layers(m, ["features.3"])  # EfficientNet-style name, no close match among Tiny's layers
    near = ast.literal_eval(re.search(r"nearest valid names: (\[.*?\])", str(e.value)).group(1))
    assert near and set(near) <= {"conv", "act", "pool", "fc"} and "in Tiny" in str(e.value)
