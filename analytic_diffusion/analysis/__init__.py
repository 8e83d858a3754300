"""Analyses that drive samplers and networks: agreement along trajectories, comparison reports, patch-size
calibration, training dynamics of memorisation, posterior variance, denoiser Jacobians, training-set
stability, analytic teleportation. The per-sample measures they report live one
layer down, in :mod:`analytic_diffusion.metrics`."""

from .agreement import single_step, trajectories
from .calibration import calibrate_patch_sizes, plot_calibration
from .compare import load_network_spec, run_compare
from .dynamics import memorization_onset, training_dynamics
from .jacobian import (
    JacobianSpectrum,
    effective_dimensionality,
    jacobian_matrix,
    jacobian_rows,
    jacobian_spectrum,
    lanczos,
)
from .stability import disjoint_halves, training_set_stability
from .teleportation import teleportation_study
from .variance import posterior_moments, posterior_variance, variance_sweep

__all__ = [
    "JacobianSpectrum",
    "calibrate_patch_sizes",
    "disjoint_halves",
    "effective_dimensionality",
    "jacobian_matrix",
    "jacobian_rows",
    "jacobian_spectrum",
    "lanczos",
    "load_network_spec",
    "memorization_onset",
    "plot_calibration",
    "posterior_moments",
    "posterior_variance",
    "run_compare",
    "single_step",
    "teleportation_study",
    "training_dynamics",
    "training_set_stability",
    "trajectories",
    "variance_sweep",
]
