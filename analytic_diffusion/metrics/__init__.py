"""Metrics on samples and denoisers."""
from .agreement import mse, pearson_r, r2, score_cosine, seed_list, to_jsonable
from .linearity import LinearFit, fit_linear_denoiser, linearity_score, wiener_distance, wiener_matrix
from .memorization import MEMORIZATION_THRESHOLD, MemorizationReport, memorization
from .novelty import mann_whitney_u, nearest_train_distance, novelty

__all__ = ["MEMORIZATION_THRESHOLD", "MemorizationReport", "memorization", "mse", "r2", "pearson_r",
           "score_cosine", "seed_list", "to_jsonable", "LinearFit", "fit_linear_denoiser",
           "wiener_distance", "wiener_matrix", "linearity_score", "mann_whitney_u", "nearest_train_distance",
           "novelty"]
