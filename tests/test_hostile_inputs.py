"""Hostile inputs: broken, fake, huge and unusual images, escaping manifests and malicious checkpoints.

Broken images are skipped with a reason (never stopping a run), unusual pixel formats are converted, paths that
leave a manifest's folder and pickles that could run code are refused.
"""
import io as _io
import json
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuroscribe.cli import main as cli_main
from neuroscribe.config import load_config
from neuroscribe.datasets.probe import (ImageDataset, ImageLoadError, ProbeSetError, check_resize, image_folder,
                                        load_image, manifest, sample_root)
from neuroscribe.record.recorder import record
from neuroscribe.models import ModelSpecError, load_model

PHOTOS = sorted((sample_root() / "val" / "n03445777").glob("*.jpg"))  # real golf-ball photos


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(w: int, h: int) -> bytes:
    """A few dozen bytes of PNG whose header claims a ``w x h`` 1-bit image (a decompression bomb's header)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def broken_files(d: Path) -> dict[str, str]:
    """Write every kind of broken file into ``d``; returns name -> expected words of the skip reason."""
    d.mkdir(parents=True, exist_ok=True)
    jpg = PHOTOS[0].read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    bad = bytearray(jpg)
    i = bad.index(b"\xff\xc4") + 4
    bad[i:i + 26] = b"\xff" * 26  # garbage Huffman table: a JPEG that cannot be decoded
    (d / "corrupt.jpg").write_bytes(bytes(bad))
    buf = _io.BytesIO()
    Image.open(PHOTOS[1]).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    (d / "truncated.png").write_bytes(bytes(png[: len(png) // 3]))
    i = png.index(b"IDAT") + 40
    png[i:i + 16] = bytes(16)  # damaged compressed pixel data (and CRC mismatch)
    (d / "corrupt.png").write_bytes(bytes(png))
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("these are not the pixels you are looking for\n" * 20)
    (d / "bomb.png").write_bytes(png_claiming(30_000, 30_000))  # 900 Mpx: over twice PIL's limit
    (d / "bomb_warning.png").write_bytes(png_claiming(10_000, 10_000))  # 100 Mpx: over the limit (a warning)
    (d / "folder.jpg").mkdir()
    return {"truncated.jpg": "truncated", "corrupt.jpg": "corrupt", "truncated.png": "truncated",
            "corrupt.png": "corrupt", "empty.jpg": "zero-byte", "notes.jpg": "not an image",
            "bomb.png": "decompression bomb", "bomb_warning.png": "decompression bomb",
            "folder.jpg": "not a regular file"}


def odd_modes(d: Path) -> dict[str, tuple[int, int, int]]:
    """Unusual pixel formats; returns name -> the RGB the top-left pixel must become."""
    d.mkdir(parents=True, exist_ok=True)
    photo = Image.open(PHOTOS[2]).convert("RGB")
    photo.convert("L").save(d / "gray.png")
    photo.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    rgba = photo.convert("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: composited on white
    rgba.save(d / "rgba.png")
    g16 = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    g16[0, 0] = 65535
    Image.fromarray(g16).save(d / "gray16.png")  # 16-bit grayscale PNG
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = pal.getpixel((0, 0))
    pal.save(d / "palette.png", transparency=pal.getpixel((0, 0)))
    photo.convert("1").save(d / "bilevel.png")
    top = photo.convert("L").getpixel((0, 0))
    return {"gray.png": (top,) * 3, "rgba.png": (255, 255, 255), "gray16.png": (255, 255, 255),
            "palette.png": (255, 255, 255), "bilevel.png": None, "cmyk.jpg": None}


# --------------------------------------------------------------------------------------------- loading
def test_every_broken_file_is_refused_with_its_reason(tmp_path):
    expected = broken_files(tmp_path)
    for name, words in expected.items():
        with pytest.raises(ImageLoadError) as e:
            load_image(tmp_path / name)
        assert words in str(e.value), (name, str(e.value))
    with pytest.raises(ImageLoadError, match="missing"):
        load_image(tmp_path / "gone.jpg")


def test_decompression_bomb_limit_is_pil_s_own(tmp_path, monkeypatch):
    Image.new("1", (3000, 3000)).save(tmp_path / "big.png")  # 9 Mpx in a 1 kB file: fine by default
    assert load_image(tmp_path / "big.png").size == (3000, 3000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)  # a stricter limit is respected
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_unusual_pixel_formats_become_8_bit_rgb(tmp_path):
    want = odd_modes(tmp_path)
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")  # really 16-bit on disk
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    for name, px in want.items():
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (128, 128), name
        if px is not None:
            assert im.getpixel((0, 0)) == px, name
    # 16-bit values are scaled, not clipped: mid-gray stays mid-gray
    g8 = np.asarray(load_image(tmp_path / "gray.png"))[..., 0].astype(int)
    g16 = np.asarray(load_image(tmp_path / "gray16.png"))[..., 0].astype(int)
    assert np.abs(g8 - g16)[1:, 1:].max() <= 1


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path):
    Image.new("RGB", (4000, 1), (9, 9, 9)).save(tmp_path / "strip.png")  # 12 kB file, 200 Mpx after Resize(224)
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        check_resize((4000, 1), 224)
    check_resize((4000, 3000), 224)  # ordinary photos pass
    probe = image_folder(tmp_path)
    ds = ImageDataset(probe, lambda im: pytest.fail("the transform must not run"), resize=224)
    x, _, reason = ds[0]
    assert x is None and "aspect ratio" in reason


def test_fuzzed_images_never_raise_anything_but_a_skip(tmp_path):
    import random
    rng = random.Random(0)
    sources = [PHOTOS[3].read_bytes()]
    for fmt in ("PNG", "GIF", "TIFF", "WEBP", "BMP"):
        buf = _io.BytesIO()
        Image.open(PHOTOS[3]).save(buf, fmt)
        sources.append(buf.getvalue())
    outcomes = {"ok": 0, "skip": 0}
    for n in range(240):
        d = bytearray(sources[n % len(sources)])
        if n % 2:
            d = d[: rng.randrange(1, len(d))]
        else:
            for _ in range(rng.randint(1, 12)):
                d[rng.randrange(len(d))] = rng.randrange(256)
        p = tmp_path / f"f{n}.img"
        p.write_bytes(bytes(d))
        try:
            assert load_image(p).mode == "RGB"
            outcomes["ok"] += 1
        except ImageLoadError:
            outcomes["skip"] += 1
    assert outcomes["skip"] > 50 and outcomes["ok"] > 10


# --------------------------------------------------------------------------------------------- a whole run
def test_record_on_a_hostile_probe_set_skips_and_names_every_bad_file(tmp_path):
    root = tmp_path / "probe"
    expected = broken_files(root / "bad")
    modes = odd_modes(root / "odd")
    Image.new("RGB", (30_000, 1), (1, 2, 3)).save(root / "bad" / "strip.png")  # 64 x 1.9 M after Resize(64)
    expected["strip.png"] = "aspect ratio"
    shutil.rmtree(root / "bad" / "folder.jpg")  # an image folder lists files only; the loader test covers it
    del expected["folder.jpg"]
    (root / "good").mkdir()
    weird = '"><img src=x onerror=alert(1)>.jpg'  # HTML in a file name: stored verbatim, escaped by JSON
    for i, p in enumerate(PHOTOS[:5]):
        shutil.copy(p, root / "good" / (weird if i == 0 else p.name))
    cfg = load_config(None, {"model": "efficientnet-lite0", "layers": ["_blocks.2"], "out": str(tmp_path / "job"),
                             "data": {"root": str(root)}, "preprocess": {"resize": 64, "crop": 64},
                             "record": {"k": 4}, "batch_size": 8, "workers": 1, "progress": False})
    path = record(cfg)
    meta = json.loads((path / "meta.json").read_text())
    skipped = {Path(rel).name: reason for _, rel, reason in meta["skipped"]}
    assert set(skipped) == set(expected), skipped
    for name, words in expected.items():
        assert words in skipped[name], (name, skipped[name])
    assert meta["n_images"] == len(expected) + len(modes) + 5 and meta["n_recorded"] == len(modes) + 5
    import pyarrow.parquet as pq
    table = pq.read_table(path / "images.parquet").to_pylist()
    assert any(r["path"] == f"good/{weird}" and r["skipped"] is None for r in table)
    from safetensors.torch import load_file
    ids = load_file(str(path / "layers" / "_blocks.2.safetensors"))["ids"]
    bad_ids = {i for i, _, _ in meta["skipped"]}
    assert ids.min() >= 0 and not bad_ids & set(ids.unique().tolist())  # exemplars are only good images


# --------------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "imgs/../../outside.jpg"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_paths_escaping_their_folder_are_refused(tmp_path, bad, fmt):
    d = tmp_path / "set"
    (d / "imgs").mkdir(parents=True)
    shutil.copy(PHOTOS[0], d / "imgs" / "ok.jpg")
    rows = [{"path": "imgs/ok.jpg", "label": "golf"}, {"path": bad, "label": "golf"}]
    if fmt == "csv":
        m = d / "m.csv"
        m.write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    else:
        m = d / "m.jsonl"
        m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ProbeSetError, match="escapes the manifest's folder"):
        manifest(m)


def test_manifest_symlink_out_of_its_folder_is_refused(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (tmp_path / "secret.jpg").write_bytes(PHOTOS[0].read_bytes())
    (d / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (d / "m.csv").write_text("path\nlink.jpg\n")
    with pytest.raises(ProbeSetError, match="escapes"):
        manifest(d / "m.csv")


def test_escaping_manifest_stops_the_command_line_before_any_work(tmp_path, capsys):
    d = tmp_path / "set"
    d.mkdir()
    (d / "m.csv").write_text("path\n../../etc/passwd\n")
    rc = cli_main(["record", "--data", str(d / "m.csv"), "--layers", "_blocks.2", "--out", str(tmp_path / "job"),
                   "--quiet"])
    assert rc == 2 and "escapes the manifest's folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- checkpoints
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_checkpoint_is_refused_by_default(tmp_path, how, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(ModelSpecError, match="refusing to load"):
        load_model(f"checkpoint:{evil}", arch="torchvision:resnet18")
    assert not marker.exists()
    rc = cli_main(["record", "--model", f"checkpoint:{evil}", "--layers", "layer1", "--out", str(tmp_path / "j"),
                   "--set", "model.arch=torchvision:resnet18", "--quiet"])
    assert rc == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "j" / "record").exists()


def test_pickled_module_needs_the_explicit_opt_in(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), path)
    with pytest.raises(ModelSpecError, match="allow_pickle"):
        load_model(f"checkpoint:{path}")
    lm = load_model(f"checkpoint:{path}", allow_pickle=True)  # a file the user trusts
    assert lm.info["format"] == "pickled module"


def test_imagenet_wordnet_folders_get_readable_class_names(tmp_path):
    """Imagenette/ImageNet trees name folders by WordNet id: cues must write 'tench', not 'n01440764'."""
    img = Image.new("RGB", (8, 8))
    for wnid in ("n01440764", "n03445777"):
        (tmp_path / "wn" / wnid).mkdir(parents=True)
        img.save(tmp_path / "wn" / wnid / "a.png")
    assert image_folder(tmp_path / "wn").class_names == ["tench", "golf ball"]
    (tmp_path / "wn" / "n99999999").mkdir()  # not an ImageNet-1k id: every folder keeps its own name
    img.save(tmp_path / "wn" / "n99999999" / "a.png")
    assert image_folder(tmp_path / "wn").class_names == ["n01440764", "n03445777", "n99999999"]
    (tmp_path / "wn" / "classes.json").write_text(json.dumps({"n01440764": "fish"}))  # an explicit map wins
    assert image_folder(tmp_path / "wn").class_names[:2] == ["fish", "n03445777"]


def test_real_imagenette_tree_without_class_map_gets_wordnet_names(tmp_path):
    """The shipped sample's real Imagenette folders, without its classes.json: every wnid folder is named from the
    packaged WordNet table, and the names agree with the sample's own class map."""
    from neuroscribe.datasets.probe import sample_root
    for wnid in sorted(d.name for d in (sample_root() / "val").iterdir() if d.is_dir()):
        (tmp_path / "val").mkdir(exist_ok=True)
        (tmp_path / "val" / wnid).symlink_to(sample_root() / "val" / wnid, target_is_directory=True)
    expected = json.loads((sample_root() / "classes.json").read_text())
    probe = image_folder(tmp_path, "val")
    assert probe.class_names == [expected[w] for w in sorted(expected)]
    assert probe.class_names[0] == "tench" and probe.class_names[-1] == "parachute" and len(probe) == 100


def test_full_imagenette_class_names(imagenette):
    """The full Imagenette tree itself (no class map beside it) reads as the ten class names."""
    names = image_folder(imagenette, "val").class_names
    assert names[0] == "tench" and names[-1] == "parachute" and len(names) == 10
