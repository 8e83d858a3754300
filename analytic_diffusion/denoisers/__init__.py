"""Analytic denoisers: small classes that configure the retrieval primitive; no kernel code lives here."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ..ops import sigma_rows
from .base import Denoiser, Posterior
from .equivariant import BoundaryBrokenELS, EquivariantLocalScore
from .local import PSPC, LocalScore, PSPCFlex
from .local_base import LocalDenoiser
from .neighbours import KNNEstimator, Nearest, TopK
from .optimal import Optimal, RetrievalDenoiser
from .pca_locality import PCALocality
from .posterior_sample import PosteriorSampleDenoiser
from .smoothed import Smoothed
from .wiener import Wiener

if TYPE_CHECKING:
    from ..data import Dataset

GLOBAL_METHODS = (Optimal, TopK, Nearest, Wiener, Smoothed, KNNEstimator, PosteriorSampleDenoiser)
LOCAL_METHODS = (LocalScore, EquivariantLocalScore, BoundaryBrokenELS, PSPC, PSPCFlex, PCALocality)
DENOISERS: dict[str, type[RetrievalDenoiser] | type[Wiener]] = {cls.name: cls for cls in GLOBAL_METHODS + LOCAL_METHODS}


def denoiser_options(name: str) -> list[str]:
    """Keyword options a method accepts (its own and its base classes')."""
    cls = _lookup(name)
    opts = []
    for klass in cls.__mro__:
        if klass in (Denoiser, object):
            continue
        for p in list(inspect.signature(klass.__init__).parameters.values())[2:]:  # type: ignore[misc, unused-ignore]
            if (
                p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.name not in opts
                and p.name not in cls.hidden_options
            ):
                opts.append(p.name)
    return opts


def _lookup(name: str) -> type[RetrievalDenoiser] | type[Wiener]:
    if name not in DENOISERS:
        raise ValueError(f"method: unknown method {name!r}; expected one of {', '.join(DENOISERS)}")
    return DENOISERS[name]


def make_denoiser(name: str, dataset: Dataset, **options: Any) -> Denoiser:
    """Build a denoiser by name, e.g. ``make_denoiser("topk", ds, k=200)``."""
    cls = _lookup(name)
    valid = denoiser_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"method {name!r}: unknown option(s) {unknown}; valid options: {', '.join(valid)}")
    return cls(dataset, **options)


__all__ = [
    "DENOISERS",
    "PSPC",
    "BoundaryBrokenELS",
    "Denoiser",
    "EquivariantLocalScore",
    "KNNEstimator",
    "LocalDenoiser",
    "LocalScore",
    "Nearest",
    "Optimal",
    "PCALocality",
    "PSPCFlex",
    "Posterior",
    "PosteriorSampleDenoiser",
    "RetrievalDenoiser",
    "Smoothed",
    "TopK",
    "Wiener",
    "denoiser_options",
    "make_denoiser",
    "sigma_rows",
]
