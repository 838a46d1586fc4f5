"""On-disk cache of feature arrays.

Each entry is one uncompressed ``.npz`` file named by a key derived from the dataset's content
hash, the featurizer's parameters and the matfusion version.  Every file stores a SHA-256 of
its arrays; a file that cannot be read or fails that check is reported, deleted and rebuilt.
Writes go to a temporary file first and are renamed into place (atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

import numpy as np

from .. import __version__

log = logging.getLogger("matfusion.data")

_CHECKSUM = "__sha256__"


def cache_key(kind: str, content_hash: str, params: dict) -> str:
    blob = json.dumps({"kind": kind, "data": content_hash, "params": params, "version": __version__}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def default_cache_dir() -> Path:
    env = os.environ.get("MATFUSION_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "matfusion"


def arrays_digest(arrays: dict) -> str:
    """SHA-256 of named arrays: each name, dtype, shape and C-order bytes, by name (the bytes
    read in place, not copied)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()


def atomic_write(path: Path, content: Union[bytes, Callable[[BinaryIO], None]]) -> None:
    """``content`` (bytes, or a function writing to the open file) into a temporary file beside
    ``path``, then renamed to ``path``: a reader sees the old file or the whole new one, never
    part of it (the temporary file is removed on any error)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            content(fh) if callable(content) else fh.write(content)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class FeatureCache:
    def __init__(self, directory: Optional[str | os.PathLike] = None) -> None:
        self.directory = Path(directory) if directory else default_cache_dir()
        self.rebuilt: list[str] = []  # keys whose files were corrupt and got discarded

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str) -> Optional[dict]:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            stored = str(arrays.pop(_CHECKSUM))
            if stored != arrays_digest(arrays):
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
            log.warning("feature cache %s is corrupt (%s); rebuilding it", path, err)
            self.rebuilt.append(key)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        return arrays

    def save(self, key: str, arrays: dict) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        payload = dict(arrays)
        payload[_CHECKSUM] = np.array(arrays_digest(arrays))
        atomic_write(path, lambda fh: np.savez(fh, **payload))
        return path
