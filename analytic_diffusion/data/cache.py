"""On-disk cache of dataset statistics (mean, covariance, PCA), keyed by a hash of everything that changes them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .. import env


def cache_dir() -> Path:
    """``$AD_CACHE_DIR``, default ``~/.cache/analytic_diffusion`` (read at each call so tests can redirect it)."""
    return Path(env.read("AD_CACHE_DIR") or Path.home() / ".cache" / "analytic_diffusion")


def fingerprint(tensor: torch.Tensor) -> str:
    """Content hash of a tensor's raw bytes, so edited data never hits a stale cache entry."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def key_path(kind: str, params: dict) -> Path:
    digest = hashlib.blake2b(_canonical(params).encode(), digest_size=16).hexdigest()
    return cache_dir() / f"{kind}-{digest}.pt"


def cached(kind: str, params: dict, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Load ``kind`` for ``params`` from disk, or compute it and store it atomically.

    The file also stores the full parameter text and is only trusted when it matches (guards against hash
    collisions); an unreadable or foreign file is recomputed and overwritten rather than raising.
    """
    hit = lookup(kind, params)
    if hit is not None:
        return hit
    tensors = {k: v.detach().cpu() for k, v in compute().items()}
    store(kind, params, tensors)
    return tensors


def lookup(kind: str, params: dict) -> dict[str, torch.Tensor] | None:
    """The stored entry for ``params``, or None (missing, foreign or unreadable)."""
    return _load(key_path(kind, params), _canonical(params))


def store(kind: str, params: dict, tensors: dict[str, torch.Tensor]) -> None:
    _save_atomic(key_path(kind, params), {"params": _canonical(params), "tensors": tensors})


def _canonical(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _load(path: Path, text: str) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob["params"] != text or not all(torch.is_tensor(v) for v in blob["tensors"].values()):
            return None
        return blob["tensors"]
    except Exception:  # truncated / corrupt / old format: a cache must never turn into a crash
        return None


def _save_atomic(path: Path, blob) -> None:
    """Write to a temp file in the same directory, then os.replace: readers never see a partial file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(blob, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:  # read-only home, full disk: the statistics are still correct, just not saved
        pass
