"""Artifacts on disk: atomic writes (every artifact appears whole or not at all: write to a temporary name, fsync,
rename) and the keys that tell a stage whether its artifact is current (each JSON artifact carries the key of
its inputs; a stage whose artifact has the same key skips its work)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``folder`` for the block: writers of one file in that folder
    that all take it run one at a time. Where no such lock can be had -- no ``flock`` (Windows), or a file system that
    refuses it on a folder (NFS turns ``flock`` into a POSIX lock, which wants a descriptor open for writing) -- the
    block runs unlocked, as it would have without this."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the CI's platform
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # unlocked, as above
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def append_line(path: str | Path, line: str) -> None:
    """Add ``line`` (one line, no newline) to the text file ``path``: the file is rewritten atomically, so it is
    whole or as before, under :func:`folder_lock` on its folder, so that two processes appending at once keep both
    lines (a bare read-modify-rewrite would lose one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent):
        write_text(path, (path.read_text() if path.exists() else "") + line + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tensors made contiguous and moved to the CPU)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces ``path`` only when the block succeeds. With
    ``replace=False`` a ``path`` that appeared meanwhile (another process that wrote the same thing) is kept and the
    new copy dropped: no reader of the finished one ever sees it swapped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists() and not replace:
            return
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def artifact_key(*parts: Any) -> str:
    """A short hash of a stage's inputs (JSON-serialisable parts: configs, other keys, file keys)."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def current(path: Path, key: str) -> dict | None:
    """The JSON artifact at ``path`` if it was made from inputs with this ``key``, else None (rerun the stage)."""
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            return d
    return None


def file_key(path: Path) -> str:
    """A short hash of a file's bytes ("missing" for no file)."""
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest() if path.is_file() else "missing"
