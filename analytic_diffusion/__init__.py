"""analytic-diffusion: exact, fast training-free (analytic) diffusion denoisers, samplers and kernels.

    import analytic_diffusion as ad
    ds = ad.load_dataset("mnist")
    result = ad.sample(ad.make_denoiser("optimal", ds), n=16, steps=18, sampler="heun", seed=0)

The layers, lowest first (each imports only from those below it; tests/test_layering.py checks it):
``kernels`` / ``_cpu`` / ``_cuda`` → ``ops`` (the retrieval primitive and its backends) → ``grids`` (σ grids),
``viz`` → ``data`` → ``denoisers``, ``metrics`` → ``sampling``, ``networks`` → ``analysis``, ``benchmark`` →
``cli``. docs/design.md explains why.
"""
import importlib

__version__ = "0.1.0"

# Public names -> defining subpackage, imported on first use so that `import analytic_diffusion` stays cheap.
_EXPORTS = {
    **dict.fromkeys(["Dataset", "load_dataset"], "data"),
    **dict.fromkeys(["Denoiser", "Posterior", "DENOISERS", "make_denoiser", "denoiser_options", "Optimal", "TopK",
                     "Nearest", "Wiener", "Smoothed", "KNNEstimator", "PosteriorSampleDenoiser", "LocalScore",
                     "EquivariantLocalScore", "BoundaryBrokenELS", "PSPC", "PSPCFlex", "PCALocality"], "denoisers"),
    **dict.fromkeys(["PatchSchedule"], "denoisers.patch_schedule"),
    **dict.fromkeys(["load_patch_schedule"], "denoisers.patch_presets"),
    **dict.fromkeys(["Schedule", "SCHEDULES", "get_schedule", "karras", "vp_linear", "vp_cosine", "kamb_sigma"],
                    "grids"),
    **dict.fromkeys(["sample", "SampleResult", "run_sample", "SAMPLERS", "get_sampler", "sample_euler",
                     "sample_heun", "sample_ddim", "sample_ddpm", "sample_teleported"], "sampling"),
    **dict.fromkeys(["VPAdapter", "EDMAdapter", "CallableAdapter", "load_network", "train_network"], "networks"),
    **dict.fromkeys(["memorization", "novelty", "mse", "r2", "pearson_r", "score_cosine"], "metrics"),
    **dict.fromkeys(["single_step", "trajectories", "posterior_variance", "jacobian_spectrum", "jacobian_rows",
                     "effective_dimensionality", "training_set_stability", "teleportation_study"], "analysis"),
    **dict.fromkeys(["KeyBank", "PartialState", "softmax_retrieval", "combine_partials", "knn_search",
                     "certified_retrieval"], "ops"),
    **dict.fromkeys(["to_diffusers", "to_edm", "to_smalldiffusion"], "integrations"),
    **dict.fromkeys(["ShardGroup", "ShardError", "init_from_env"], "ops.distributed"),
    **dict.fromkeys(["pack", "load_packed"], "data.packed"),
    **dict.fromkeys(["sample_parallel"], "sampling.parallel"),
}
# Subpackages reachable as attributes (ad.ops, ad.metrics, ...) without an explicit import.
_SUBPACKAGES = ("data", "ops", "grids", "denoisers", "metrics", "sampling", "networks", "analysis", "viz",
                "benchmark", "integrations", "cli")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'analytic_diffusion' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
