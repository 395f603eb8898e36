"""Generate ``neuroscribe/data/imagenet_wordnet.json``: names and hypernym chains of the ImageNet-1k classes.

One-off generator; the JSON it writes is committed, so neither WordNet nor timm is needed at run time.

Sources
-------
* Class order: timm's ``timm/data/_info/imagenet_synsets.txt`` (the standard ImageNet-1k order, one WordNet id
  such as ``n01440764`` per line; line ``i`` is logit ``i`` of an ImageNet-1k classifier).
* Names and hypernyms: Princeton WordNet 3.0 noun database, ``/usr/share/wordnet/data.noun`` from the Debian
  package ``wordnet-base`` (``apt-get install wordnet-base``). ImageNet wnids are WordNet 3.0 noun synset offsets:
  ``n%08d`` is the byte offset of the synset's line in ``data.noun``, so the file is parsed directly (no NLTK).
  WordNet 3.0 licence: https://wordnet.princeton.edu/license-and-commercial-use (free, attribution).
* Word frequency of each ancestor name: ``wordfreq.zipf_frequency(name, "en")`` (PyPI ``wordfreq``; Zipf scale,
  log10 of occurrences per billion words). Stored so that the run-time vocabulary can drop taxonomic jargon
  ("cyprinid", "chordate", "diapsid") without importing wordfreq.

Output (compact JSON, one object)
---------------------------------
``{"source": str, "classes": [{"index": int, "wnid": str, "names": [str, ...], "hypernyms": [str, ...]}, ...],
"zipf": {ancestor name: float}}``

* ``names``: the synset's lemmas with underscores turned into spaces, in WordNet order (the first is the
  preferred name), original case kept ("French horn").
* ``hypernyms``: the primary hypernym chain, nearest first, up to the root ("entity"): at each step the first
  ``@`` (hypernym) or ``@i`` (instance hypernym) pointer of the current synset is followed, and the preferred name
  of each ancestor is recorded. E.g. golf ball -> ball, game equipment, equipment, instrumentality, artifact,
  whole, object, physical entity, entity.

Usage: ``python tools/make_wordnet.py [--wordnet-dir /usr/share/wordnet] [--out PATH]``
(default output: ``neuroscribe/data/imagenet_wordnet.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "neuroscribe" / "data" / "imagenet_wordnet.json"


def timm_synsets_path() -> Path:
    """Locate timm's ImageNet-1k synset list (``imagenet_synsets.txt``) inside the installed timm package."""
    try:
        import timm  # noqa: PLC0415 - only needed by this generator
    except ImportError as err:  # pragma: no cover - generator-only dependency
        raise SystemExit("tools/make_wordnet.py needs timm installed (pip install timm) for the class list") from err
    path = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    if not path.is_file():
        raise SystemExit(f"timm is installed but {path} is missing; a timm >= 0.9 is expected")
    return path


class WordNetNouns:
    """Random access to WordNet 3.0 ``data.noun`` by synset offset."""

    def __init__(self, data_noun: Path) -> None:
        if not data_noun.is_file():
            raise SystemExit(f"{data_noun} not found: install Debian 'wordnet-base' or pass --wordnet-dir")
        self._bytes = data_noun.read_bytes()
        self._cache: dict[int, tuple[list[str], list[int]]] = {}

    def synset(self, offset: int) -> tuple[list[str], list[int]]:
        """Return (lemma names, hypernym offsets in pointer order) of the noun synset at ``offset``."""
        if offset in self._cache:
            return self._cache[offset]
        end = self._bytes.find(b"\n", offset)
        line = self._bytes[offset:end].decode("utf-8")
        fields = line.split(" ")
        if int(fields[0]) != offset or fields[2] != "n":
            raise ValueError(f"offset {offset:08d} does not start a noun synset line in data.noun")
        n_words = int(fields[3], 16)
        names = [fields[4 + 2 * k].replace("_", " ") for k in range(n_words)]
        pos = 4 + 2 * n_words
        n_ptrs = int(fields[pos])
        pos += 1
        hypernyms: list[int] = []
        for _ in range(n_ptrs):
            symbol, target, target_pos = fields[pos], int(fields[pos + 1]), fields[pos + 2]
            if symbol in ("@", "@i") and target_pos == "n":
                hypernyms.append(target)
            pos += 4
        self._cache[offset] = (names, hypernyms)
        return names, hypernyms

    def chain(self, offset: int) -> list[str]:
        """Preferred names of the primary hypernym chain of ``offset``, nearest first, root last."""
        out: list[str] = []
        seen = {offset}
        _, parents = self.synset(offset)
        while parents:
            parent = parents[0]
            if parent in seen:  # WordNet has no cycles, but never loop forever on a corrupt file
                raise ValueError(f"hypernym cycle at {parent:08d}")
            seen.add(parent)
            names, parents = self.synset(parent)
            out.append(names[0])
        return out


def build(wordnet_dir: Path, synsets_txt: Path) -> dict:
    """Build the JSON-ready dictionary for the 1000 ImageNet classes."""
    wnids = [w.strip() for w in synsets_txt.read_text().splitlines() if w.strip()]
    if len(wnids) != 1000:
        raise ValueError(f"{synsets_txt} lists {len(wnids)} synsets, expected the 1000 ImageNet-1k classes")
    nouns = WordNetNouns(wordnet_dir / "data.noun")
    classes = []
    for index, wnid in enumerate(wnids):
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise ValueError(f"line {index} of {synsets_txt}: {wnid!r} is not a WordNet noun id")
        offset = int(wnid[1:])
        names, _ = nouns.synset(offset)
        classes.append({"index": index, "wnid": wnid, "names": names, "hypernyms": nouns.chain(offset)})
    try:
        from wordfreq import zipf_frequency  # noqa: PLC0415 - generator-only dependency
    except ImportError as err:  # pragma: no cover
        raise SystemExit("tools/make_wordnet.py needs wordfreq (pip install wordfreq) for word frequencies") from err
    ancestors = sorted({h for c in classes for h in c["hypernyms"]})
    return {
        "source": "Princeton WordNet 3.0 (Debian wordnet-base data.noun); ImageNet-1k order from timm "
        "imagenet_synsets.txt; Zipf frequencies from wordfreq; generated by tools/make_wordnet.py",
        "classes": classes,
        "zipf": {h: round(zipf_frequency(h, "en"), 2) for h in ancestors},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--synsets", type=Path, default=None, help="ImageNet-1k wnid list (default: timm's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    data = build(args.wordnet_dir, args.synsets or timm_synsets_path())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode()) / 1024:.0f} KB, {len(data['classes'])} classes)")


if __name__ == "__main__":
    main()
