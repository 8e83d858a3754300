"""Analyses that drive samplers and networks: agreement along trajectories, comparison reports, patch-size
calibration, training dynamics of memorisation, posterior variance, denoiser Jacobians, training-set
stability, analytic teleportation. The per-sample measures they report live one
layer down, in :mod:`analytic_diffusion.metrics`."""
from .agreement import single_step, trajectories
from .calibration import calibrate_patch_sizes, plot_calibration
from .compare import load_network_spec, run_compare
from .dynamics import memorization_onset, training_dynamics
from .jacobian import (JacobianSpectrum, effective_dimensionality, jacobian_matrix, jacobian_rows,
                       jacobian_spectrum, lanczos)
from .stability import disjoint_halves, training_set_stability
from .teleportation import teleportation_study
from .variance import posterior_moments, posterior_variance, variance_sweep

__all__ = ["single_step", "trajectories", "calibrate_patch_sizes", "plot_calibration", "run_compare",
           "load_network_spec", "training_dynamics", "memorization_onset", "posterior_variance",
           "posterior_moments", "variance_sweep", "JacobianSpectrum", "jacobian_matrix", "jacobian_spectrum",
           "jacobian_rows", "effective_dimensionality", "lanczos", "training_set_stability", "disjoint_halves",
           "teleportation_study"]
