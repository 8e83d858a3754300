"""The retrieval primitive behind every analytic denoiser, with backend dispatch (docs/design.md §3-4)."""

from . import subset  # exact float64 rescoring / weighted means over listed candidates (k-NN denoisers)
from .keys import KeyBank
from .partial import PartialState, combine_partials
from .pruning import CertifiedResult, CertifiedState, certified_retrieval
from .retrieval import (
    BACKENDS,
    DEFAULT_MEMORY_BUDGET,
    RetrievalResult,
    all_labels,
    check_has_values,
    choose_backend,
    gather_rows,
    hflip_rows,
    knn_search,
    posterior_draw,
    sigma_rows,
    softmax_retrieval,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_MEMORY_BUDGET",
    "CertifiedResult",
    "CertifiedState",
    "KeyBank",
    "PartialState",
    "RetrievalResult",
    "all_labels",
    "certified_retrieval",
    "check_has_values",
    "choose_backend",
    "combine_partials",
    "gather_rows",
    "hflip_rows",
    "knn_search",
    "posterior_draw",
    "sigma_rows",
    "softmax_retrieval",
    "subset",
]
