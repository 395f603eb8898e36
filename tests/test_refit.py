"""MILAN's re-fit variant: the last linear layer re-fitted on training images with the units still ablated."""
import torch

from neuroscribe.ablate.edit import ablation_edits
from neuroscribe.ablate.refit import last_linear, refit_last_layer
from neuroscribe.datasets.probe import load_image, sample_root
from neuroscribe.hooks import trace
from neuroscribe.models import load_model


def test_refit_learns_the_training_labels_and_keeps_the_ablation():
    torch.manual_seed(0)
    lm = load_model("torchvision:resnet18@none", num_classes=3)
    tf = lm.preprocess.with_overrides(resize=64, crop=64).transform()
    wnids = sorted(p.name for p in (sample_root() / "train").iterdir() if p.is_dir())[:3]
    xs, ys = [], []
    for c, w in enumerate(wnids):
        for p in sorted((sample_root() / "train" / w).glob("*.jpg"))[:20]:
            xs.append(tf(load_image(p)))
            ys.append(c)
    x, y = torch.stack(xs), torch.tensor(ys)
    loader = [(x[i:i + 20], y[i:i + 20]) for i in range(0, len(x), 20)]
    units = [("layer4.1.bn2", 3), ("layer4.1.bn2", 7)]
    assert last_linear(lm.module) == "fc"
    before = lm.module.fc.weight.clone()
    refit = refit_last_layer(lm.module, units, loader, "zero", device="cpu")
    assert torch.equal(lm.module.fc.weight, before)  # the original model is untouched
    edits = ablation_edits(refit, {"layer4.1.bn2": [3, 7]}, "zero")
    with torch.no_grad(), trace(refit, retain=["layer4.1.bn2"], edit=edits) as tr:
        out = refit(x)
    assert torch.all(tr["layer4.1.bn2"][:, [3, 7]] == 0)
    with torch.no_grad():
        base_acc = (lm.module(x).argmax(1) == y).float().mean().item()
    acc = (out.argmax(1) == y).float().mean().item()
    assert acc >= 0.8 and acc > base_acc, (acc, base_acc)  # random-init head ~ chance; the re-fit head fits
