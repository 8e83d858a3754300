"""Metrics on samples and denoisers."""

from .agreement import mse, pearson_r, r2, score_cosine, seed_list, to_jsonable
from .linearity import LinearFit, fit_linear_denoiser, linearity_score, wiener_distance, wiener_matrix
from .memorization import MEMORIZATION_THRESHOLD, MemorizationReport, memorization
from .novelty import mann_whitney_u, nearest_train_distance, novelty

__all__ = [
    "MEMORIZATION_THRESHOLD",
    "LinearFit",
    "MemorizationReport",
    "fit_linear_denoiser",
    "linearity_score",
    "mann_whitney_u",
    "memorization",
    "mse",
    "nearest_train_distance",
    "novelty",
    "pearson_r",
    "r2",
    "score_cosine",
    "seed_list",
    "to_jsonable",
    "wiener_distance",
    "wiener_matrix",
]
