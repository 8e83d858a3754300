"""The retrieval primitive behind every analytic denoiser, with backend dispatch (docs/design.md §3-4)."""
from .keys import KeyBank
from .partial import PartialState, combine_partials
from .pruning import CertifiedResult, CertifiedState, certified_retrieval
from .retrieval import (BACKENDS, all_labels, DEFAULT_MEMORY_BUDGET, RetrievalResult, choose_backend, gather_rows,
                        hflip_rows, knn_search, posterior_draw, sigma_rows, softmax_retrieval)
from . import subset  # exact float64 rescoring / weighted means over listed candidates (k-NN denoisers)

__all__ = ["all_labels", "KeyBank", "PartialState", "combine_partials", "BACKENDS", "DEFAULT_MEMORY_BUDGET",
           "RetrievalResult", "choose_backend", "gather_rows", "hflip_rows", "knn_search", "sigma_rows",
           "softmax_retrieval", "posterior_draw", "certified_retrieval", "CertifiedResult", "CertifiedState", "subset"]
