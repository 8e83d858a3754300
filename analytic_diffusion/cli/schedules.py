"""List the patch-size schedule presets."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def run(args: argparse.Namespace) -> int:
    from ..denoisers.patch_presets import ALIASES, PRESET_INFO, PRESETS

    for name, sch in PRESETS.items():
        span = f"σ in [{min(sch.sigmas):.4g}, {max(sch.sigmas):.4g}]"
        order = sorted(zip(sch.sigmas, sch.sizes))
        print(
            f"{name}\n    {PRESET_INFO.get(name, '')}\n    {span}, {len(sch.sizes)} points; "
            f"k (low → high σ): {' '.join(str(k) for _, k in order)}"
        )
    print("aliases: " + ", ".join(f"{a} = {b}" for a, b in ALIASES.items()))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("schedules", help="list the patch-size schedule presets (σ span and sizes)").set_defaults(func=run)
