"""On-disk cache of dataset statistics (mean, covariance, PCA), keyed by a hash of everything that changes them.

An entry is trusted only when it proves itself (docs/design.md §14.2): it stores its kind, the full parameter
text and a BLAKE2b checksum over the kind, the parameters and every tensor's name, dtype, shape and bytes. A
missing entry is computed and stored; an entry that is unreadable, of another kind, for other parameters or whose
checksum fails (a flipped bit, two files swapped) is recomputed and rewritten with a warning naming the file,
never used. A cache that cannot be written (read-only home, full disk) warns and the run goes on: the statistics
are correct, only not saved.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .. import env


def cache_dir() -> Path:
    """``$AD_CACHE_DIR``, default ``~/.cache/analytic_diffusion`` (read at each call so tests can redirect it)."""
    return Path(env.read("AD_CACHE_DIR") or Path.home() / ".cache" / "analytic_diffusion")


def _update(h: Any, t: torch.Tensor) -> None:  # h: a hashlib object (typeshed has no common base)
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def fingerprint(tensor: torch.Tensor) -> str:
    """Content hash of a tensor's raw bytes, so edited data never hits a stale cache entry."""
    h = hashlib.blake2b(digest_size=16)
    _update(h, tensor)
    return h.hexdigest()


def key_path(kind: str, params: dict[str, Any]) -> Path:
    digest = hashlib.blake2b(_canonical(params).encode(), digest_size=16).hexdigest()
    return cache_dir() / f"{kind}-{digest}.pt"


def entry_checksum(kind: str, text: str, tensors: dict[str, torch.Tensor]) -> str:
    """What an entry must hash to: its kind, its parameter text and each tensor (name, dtype, shape, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{kind}\0{text}\0".encode())
    for name in sorted(tensors):
        h.update(f"{name}\0".encode())
        _update(h, tensors[name])
    return h.hexdigest()


def cached(
    kind: str, params: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Load ``kind`` for ``params`` from disk, or compute it and store it atomically (see the module docstring)."""
    hit = lookup(kind, params)
    if hit is not None:
        return hit
    tensors = {k: v.detach().cpu() for k, v in compute().items()}
    store(kind, params, tensors)
    return tensors


def lookup(kind: str, params: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The stored entry for ``params``, or None (missing; or untrustworthy, with a warning)."""
    return _load(key_path(kind, params), kind, _canonical(params))


def store(kind: str, params: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    text = _canonical(params)
    blob = {"kind": kind, "params": text, "tensors": tensors, "checksum": entry_checksum(kind, text, tensors)}
    _save_atomic(key_path(kind, params), blob)


def _canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _load(path: Path, kind: str, text: str) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        tensors = blob["tensors"]
        ok = (
            blob.get("kind") == kind
            and blob.get("params") == text
            and all(torch.is_tensor(v) for v in tensors.values())
            and blob.get("checksum") == entry_checksum(kind, text, tensors)
        )
        why = "its checksum, kind or parameters do not match"
    except Exception as e:  # truncated / corrupt / old format: a cache must never turn into a crash
        ok, why = False, f"it cannot be read ({type(e).__name__})"
    if ok:
        return tensors
    warnings.warn(f"statistics cache: {path} is not a valid {kind!r} entry ({why}); recomputing it", stacklevel=4)
    return None


def _save_atomic(path: Path, blob: dict[str, Any]) -> None:
    """Serialise in memory, write a temp file in the same directory and os.replace it: readers never see a
    partial file, and a full disk is an OSError on the write (torch.save straight to a file raises RuntimeError)."""
    buf = io.BytesIO()
    torch.save(blob, buf)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:  # read-only home, full disk: the statistics are still correct, just not saved
        warnings.warn(
            f"statistics cache: cannot write {path} ({e.strerror or e}); going on without caching it "
            "(set AD_CACHE_DIR to a writable folder with free space to keep it)",
            stacklevel=4,
        )
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
