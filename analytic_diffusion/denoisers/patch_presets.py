"""Published patch-size schedules, and loading a schedule by preset name or from a JSON file.

Kamb & Ganguli (arXiv 2412.20292) calibrated one patch side k per time t = i/20 (i = 0 … 19, index 0 = lowest
noise, σ = 0) by matching their local machines to trained CNNs (docs/methods.md §1.4). Their tables are
stored here in σ-space through the legacy cosine schedule, σ = kamb_sigma(t) = tan(t/1.008 · π/2); the 19-step
``kamb-cosine`` grid visits exactly the σ of i = 19 … 1. "zeros" tables belong to zero-padded networks and
pair with bbELS, "circular" ones with ELS; "-cond" tables come from class-conditional networks.

``pspc-cifar10`` is Niedoba et al.'s PSPC-Square crop schedule (docs/methods.md §2) on the 18-step EDM/Karras grid
(σ_max 80 … σ_min 0.002); its sizes are corner-anchored crops, so even sizes (32 = the whole image) are allowed.

Every preset is a :class:`~analytic_diffusion.denoisers.patch_schedule.PatchSchedule`; lookups take the nearest grid point in
log σ, and ``check_covers`` refuses σ grids that stray beyond the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ..grids import kamb_sigma, karras
from .patch_schedule import PatchSchedule

__all__ = [
    "ALIASES",
    "KAMB_TABLES",
    "PRESETS",
    "PRESET_INFO",
    "PSPC_CIFAR10_SIZES",
    "kamb_schedule",
    "list_presets",
    "load_patch_schedule",
]

# k for i = 0 … 19 at t = i/20 (docs/methods.md §1.4, from the committed scale files of henhen724/convolutional_diffusion).
KAMB_TABLES: dict[str, list[int]] = {
    "kamb-cifar10-resnet-zeros-cond": [3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17],
    "kamb-cifar10-resnet-circular-cond": [3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15, 15],
    "kamb-cifar10-unet-zeros-cond": [3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25],
    "kamb-celeba-resnet-zeros": [3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19],
    "kamb-celeba-unet-zeros": [3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27],
    "kamb-fashionmnist-resnet-zeros-cond": [3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17],
    "kamb-fashionmnist-unet-zeros-cond": [3, 3, 5, 5, 7, 7, 7, 9, 11, 11, 11, 13, 15, 15, 21, 23, 25, 25, 25, 25],
    "kamb-mnist-resnet-zeros": [3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15],
    "kamb-mnist-resnet-circular": [3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3],
    "kamb-mnist-unet-zeros": [3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27],
}

# PSPC-Square, CIFAR-10, high noise -> low noise over the 18 σ > 0 of karras(18) (docs/methods.md §2).
PSPC_CIFAR10_SIZES = [32, 32, 32, 32, 32, 32, 32, 23, 15, 11, 7, 5, 3, 3, 3, 3, 3, 3]


def kamb_schedule(sizes: Sequence[int], name: str = "kamb") -> PatchSchedule:
    """A Kamb & Ganguli table: ``sizes[i]`` is k at t = i/len(sizes) (i = 0 is σ = 0)."""
    n = len(sizes)
    return PatchSchedule(list(sizes), [0.0 if i == 0 else kamb_sigma(i / n) for i in range(n)], name=name)


def _pspc_cifar10() -> PatchSchedule:
    sigmas = karras(len(PSPC_CIFAR10_SIZES)).sigmas[:-1].tolist()
    return PatchSchedule(PSPC_CIFAR10_SIZES, sigmas, name="pspc-cifar10", odd=False)


def _describe(name: str) -> str:
    parts = name.split("-")
    cond = ", class-conditional" if parts[-1] == "cond" else ""
    pad, pairs = ("zero", "bbELS") if "zeros" in parts else ("circular", "ELS")
    return (
        f"Kamb & Ganguli: {parts[1]} {parts[2]} ({pad} padding{cond}); t = i/20 on the kamb-cosine "
        f"grid; pairs with {pairs}"
    )


PRESETS: dict[str, PatchSchedule] = {name: kamb_schedule(sizes, name) for name, sizes in KAMB_TABLES.items()}
PRESETS["pspc-cifar10"] = _pspc_cifar10()

PRESET_INFO: dict[str, str] = {name: _describe(name) for name in KAMB_TABLES}
PRESET_INFO["pspc-cifar10"] = (
    "Niedoba et al. PSPC-Square crop sizes for CIFAR-10 on the 18-step Karras grid (32 = whole image)"
)

# Short names: the ResNet + zero-padding table of each dataset (the one paired with bbELS).
ALIASES: dict[str, str] = {
    "kamb-mnist": "kamb-mnist-resnet-zeros",
    "kamb-fashionmnist": "kamb-fashionmnist-resnet-zeros-cond",
    "kamb-cifar10": "kamb-cifar10-resnet-zeros-cond",
    "kamb-celeba": "kamb-celeba-resnet-zeros",
    "pspc": "pspc-cifar10",
}


def list_presets(aliases: bool = False) -> list[str]:
    """Preset names (and the short aliases too with ``aliases=True``)."""
    return list(PRESETS) + (list(ALIASES) if aliases else [])


def _copy(schedule: PatchSchedule) -> PatchSchedule:
    return PatchSchedule(
        list(schedule.sizes), list(schedule.sigmas), name=schedule.name, tolerance=schedule.tolerance, odd=schedule.odd
    )


def _names_hint() -> str:
    return (
        f"preset names: {', '.join(PRESETS)} (aliases: "
        f"{', '.join(f'{a} = {b}' for a, b in ALIASES.items())}); or the path of a JSON schedule file "
        "(written by PatchSchedule.save or `analytic-diffusion calibrate`)"
    )


def load_patch_schedule(name_or_path: str | os.PathLike[str]) -> PatchSchedule:
    """A preset by name (or alias), or a JSON file holding ``{"sigmas": [...], "patch_sizes": [...]}``.

    Returns a fresh PatchSchedule (changing it does not change the preset). Raises ValueError for an unknown
    name or an unreadable/invalid file and FileNotFoundError for a missing file, listing the preset names.
    """
    key = os.fspath(name_or_path)
    if key in ALIASES:
        key = ALIASES[key]
    if key in PRESETS:
        return _copy(PRESETS[key])
    if not os.path.exists(key):
        if key.lower().endswith(".json") or os.sep in key or (os.altsep and os.altsep in key):
            raise FileNotFoundError(f"patch schedule file {key!r} does not exist; {_names_hint()}")
        raise ValueError(f"unknown patch schedule {key!r}; {_names_hint()}")
    if os.path.isdir(key):
        raise ValueError(f"patch schedule {key!r} is a folder, not a JSON schedule file; {_names_hint()}")
    try:
        with open(key) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"patch schedule file {key!r} is not valid JSON ({e}); {_names_hint()}") from None
    try:
        schedule = PatchSchedule.from_json(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"patch schedule file {key!r}: {e}") from None
    if schedule.name in ("file", "custom"):
        schedule.name = os.path.basename(key)
    return schedule


def as_patch_schedule(patch: int | str | PatchSchedule | None, default: int | None = None) -> PatchSchedule:
    """Accept a constant k, a PatchSchedule, a preset name or a JSON schedule file path."""
    if isinstance(patch, PatchSchedule):
        return patch
    if patch is None:
        if default is None:
            raise ValueError("patch: give a patch size k or a patch schedule")
        return PatchSchedule.constant(default)
    if isinstance(patch, int) and not isinstance(patch, bool):
        return PatchSchedule.constant(patch)
    if isinstance(patch, str):
        return load_patch_schedule(patch)
    raise TypeError(
        f"patch: expected an odd int, a preset name, a schedule file or a PatchSchedule, got {type(patch).__name__}"
    )
