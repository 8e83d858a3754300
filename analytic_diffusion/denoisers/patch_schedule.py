"""Patch-size schedules: which patch side k a local denoiser uses at noise level σ.

A schedule is a constant k or a table of (σ, k) points looked up at the nearest grid point (nearest in log σ;
σ = 0 entries match only σ below the smallest positive point). Presets and calibration live beside this in
:mod:`analytic_diffusion.denoisers.patch_presets` and :mod:`analytic_diffusion.analysis.calibration`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def check_patch_size(k: int, name: str = "patch", odd: bool = True) -> int:
    """An odd positive integer patch side (any positive integer with ``odd=False``: PSPC crops)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or (odd and k % 2 == 0):
        kind = "odd positive" if odd else "positive"
        raise ValueError(f"{name}: patch sizes must be {kind} integers, got {k!r}")
    return k


def _integral(k: Any) -> bool:
    try:
        return not isinstance(k, bool) and float(k).is_integer()
    except (TypeError, ValueError):
        return False


@dataclass
class PatchSchedule:
    """k as a function of σ: a constant (``sigmas`` empty) or a table looked up at the nearest grid point."""

    sizes: Sequence[int]
    sigmas: Sequence[float] = field(default_factory=list)
    name: str = "custom"
    # Lookups may stray this factor beyond the table's σ span before it counts as not covering them.
    tolerance: float = 1.5
    # Centre-pixel windows (LS, ELS, bbELS) need odd k; PSPC's corner-anchored crops also take even k
    # (its CIFAR-10 table starts at 32 = the whole image), so such tables set odd=False.
    odd: bool = True

    def __post_init__(self) -> None:
        self.sizes = [
            check_patch_size(int(k) if _integral(k) else k, f"patch schedule {self.name!r}", self.odd)
            for k in self.sizes
        ]
        self.sigmas = [float(s) for s in self.sigmas]
        if not self.sizes:
            raise ValueError(f"patch schedule {self.name!r}: no patch sizes")
        if self.sigmas and len(self.sigmas) != len(self.sizes):
            raise ValueError(
                f"patch schedule {self.name!r}: {len(self.sigmas)} σ values for {len(self.sizes)} patch sizes"
            )
        if not self.sigmas and len(self.sizes) != 1:
            raise ValueError(f"patch schedule {self.name!r}: a table needs one σ per patch size")
        if any(not (s >= 0 and math.isfinite(s)) for s in self.sigmas):
            raise ValueError(f"patch schedule {self.name!r}: σ values must be finite and >= 0")

    @staticmethod
    def constant(k: int) -> PatchSchedule:
        return PatchSchedule([check_patch_size(k)], name=f"k={k}")

    @property
    def is_constant(self) -> bool:
        return not self.sigmas

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    def covers(self, sigma: float) -> bool:
        if self.is_constant:
            return True
        pos = [s for s in self.sigmas if s > 0]
        lo = 0.0 if (not pos or min(self.sigmas) == 0) else min(pos) / self.tolerance
        hi = max(self.sigmas) * self.tolerance
        return lo <= sigma <= hi

    def check_covers(self, sigmas: Iterable[float]) -> None:
        """Raise if some σ a sampler will visit lies outside the table's span."""
        bad = [float(s) for s in sigmas if float(s) > 0 and not self.covers(float(s))]
        if bad:
            raise ValueError(
                f"patch schedule {self.name!r} covers σ in [{min(self.sigmas):g}, "
                f"{max(self.sigmas):g}] (×{self.tolerance} either side) but the sampler visits "
                f"σ = {', '.join(f'{b:g}' for b in bad[:4])}"
            )

    def k_for(self, sigma: float) -> int:
        """Patch size at σ > 0 (nearest grid point in log σ)."""
        if self.is_constant:
            return self.sizes[0]
        if not self.covers(sigma):
            self.check_covers([sigma])
        positive = [(abs(math.log(sigma) - math.log(v)), i) for i, v in enumerate(self.sigmas) if v > 0]
        zero = [i for i, v in enumerate(self.sigmas) if v == 0]
        # Below the smallest positive point a σ = 0 entry (the table's clean end) is the nearest one.
        if zero and (not positive or sigma < min(v for v in self.sigmas if v > 0)):
            return self.sizes[zero[0]]
        return self.sizes[min(positive)[1]]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sigmas": list(self.sigmas), "patch_sizes": list(self.sizes)}
        if not self.odd:
            out["odd"] = False
        return out

    @staticmethod
    def from_json(obj: dict[str, Any]) -> PatchSchedule:
        if not isinstance(obj, dict):
            raise ValueError(f"patch schedule file: expected a JSON object, got {type(obj).__name__}")
        for key in ("patch_sizes",):
            if key not in obj:
                raise ValueError(f"patch schedule file: missing key {key!r}")
        if not isinstance(obj["patch_sizes"], list) or not isinstance(obj.get("sigmas", []), list):
            raise ValueError("patch schedule file: 'patch_sizes' and 'sigmas' must be lists")
        return PatchSchedule(
            obj["patch_sizes"], obj.get("sigmas", []), name=obj.get("name", "file"), odd=bool(obj.get("odd", True))
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
