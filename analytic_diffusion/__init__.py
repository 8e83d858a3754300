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
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names -> defining subpackage, imported on first use so that `import analytic_diffusion` stays cheap.
_EXPORTS = {
    **dict.fromkeys(["Dataset", "load_dataset"], "data"),
    **dict.fromkeys(
        [
            "Denoiser",
            "Posterior",
            "DENOISERS",
            "make_denoiser",
            "denoiser_options",
            "Optimal",
            "TopK",
            "Nearest",
            "Wiener",
            "Smoothed",
            "KNNEstimator",
            "PosteriorSampleDenoiser",
            "LocalScore",
            "EquivariantLocalScore",
            "BoundaryBrokenELS",
            "PSPC",
            "PSPCFlex",
            "PCALocality",
        ],
        "denoisers",
    ),
    **dict.fromkeys(["PatchSchedule"], "denoisers.patch_schedule"),
    **dict.fromkeys(["load_patch_schedule"], "denoisers.patch_presets"),
    **dict.fromkeys(
        ["Schedule", "SCHEDULES", "get_schedule", "karras", "vp_linear", "vp_cosine", "kamb_sigma"], "grids"
    ),
    **dict.fromkeys(
        [
            "sample",
            "SampleResult",
            "run_sample",
            "SAMPLERS",
            "get_sampler",
            "sample_euler",
            "sample_heun",
            "sample_ddim",
            "sample_ddpm",
            "sample_teleported",
        ],
        "sampling",
    ),
    **dict.fromkeys(["VPAdapter", "EDMAdapter", "CallableAdapter", "load_network", "train_network"], "networks"),
    **dict.fromkeys(["mse", "r2", "pearson_r", "score_cosine"], "metrics"),
    # From their own modules: metrics.memorization and metrics.novelty are also submodules, which a type checker
    # would see instead of the functions through ``from .metrics import ...``.
    **dict.fromkeys(["memorization"], "metrics.memorization"),
    **dict.fromkeys(["novelty"], "metrics.novelty"),
    **dict.fromkeys(
        [
            "single_step",
            "trajectories",
            "posterior_variance",
            "jacobian_spectrum",
            "jacobian_rows",
            "effective_dimensionality",
            "training_set_stability",
            "teleportation_study",
        ],
        "analysis",
    ),
    **dict.fromkeys(
        ["KeyBank", "PartialState", "softmax_retrieval", "combine_partials", "knn_search", "certified_retrieval"], "ops"
    ),
    **dict.fromkeys(["to_diffusers", "to_edm", "to_smalldiffusion"], "integrations"),
    **dict.fromkeys(["ShardGroup", "ShardError", "init_from_env"], "ops.distributed"),
    **dict.fromkeys(["pack", "load_packed"], "data.packed"),
    **dict.fromkeys(["sample_parallel"], "sampling.parallel"),
}
# Subpackages reachable as attributes (ad.ops, ad.metrics, ...) without an explicit import.
_SUBPACKAGES = (
    "data",
    "ops",
    "grids",
    "denoisers",
    "metrics",
    "sampling",
    "networks",
    "analysis",
    "viz",
    "benchmark",
    "integrations",
    "cli",
)

# Kept equal to _EXPORTS (plus __version__) by tests/test_layering.py; a literal, so that tools can read it.
__all__ = [
    "DENOISERS",
    "PSPC",
    "SAMPLERS",
    "SCHEDULES",
    "BoundaryBrokenELS",
    "CallableAdapter",
    "Dataset",
    "Denoiser",
    "EDMAdapter",
    "EquivariantLocalScore",
    "KNNEstimator",
    "KeyBank",
    "LocalScore",
    "Nearest",
    "Optimal",
    "PCALocality",
    "PSPCFlex",
    "PartialState",
    "PatchSchedule",
    "Posterior",
    "PosteriorSampleDenoiser",
    "SampleResult",
    "Schedule",
    "ShardError",
    "ShardGroup",
    "Smoothed",
    "TopK",
    "VPAdapter",
    "Wiener",
    "__version__",
    "certified_retrieval",
    "combine_partials",
    "denoiser_options",
    "effective_dimensionality",
    "get_sampler",
    "get_schedule",
    "init_from_env",
    "jacobian_rows",
    "jacobian_spectrum",
    "kamb_sigma",
    "karras",
    "knn_search",
    "load_dataset",
    "load_network",
    "load_packed",
    "load_patch_schedule",
    "make_denoiser",
    "memorization",
    "mse",
    "novelty",
    "pack",
    "pearson_r",
    "posterior_variance",
    "r2",
    "run_sample",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_euler",
    "sample_heun",
    "sample_parallel",
    "sample_teleported",
    "score_cosine",
    "single_step",
    "softmax_retrieval",
    "teleportation_study",
    "to_diffusers",
    "to_edm",
    "to_smalldiffusion",
    "train_network",
    "training_set_stability",
    "trajectories",
    "vp_cosine",
    "vp_linear",
]

if TYPE_CHECKING:  # what the lazy __getattr__ below returns, spelled out for IDEs and type checkers
    from .analysis import (
        effective_dimensionality as effective_dimensionality,
    )
    from .analysis import (
        jacobian_rows as jacobian_rows,
    )
    from .analysis import (
        jacobian_spectrum as jacobian_spectrum,
    )
    from .analysis import (
        posterior_variance as posterior_variance,
    )
    from .analysis import (
        single_step as single_step,
    )
    from .analysis import (
        teleportation_study as teleportation_study,
    )
    from .analysis import (
        training_set_stability as training_set_stability,
    )
    from .analysis import (
        trajectories as trajectories,
    )
    from .data import (
        Dataset as Dataset,
    )
    from .data import (
        load_dataset as load_dataset,
    )
    from .data.packed import (
        load_packed as load_packed,
    )
    from .data.packed import (
        pack as pack,
    )
    from .denoisers import (
        DENOISERS as DENOISERS,
    )
    from .denoisers import (
        PSPC as PSPC,
    )
    from .denoisers import (
        BoundaryBrokenELS as BoundaryBrokenELS,
    )
    from .denoisers import (
        Denoiser as Denoiser,
    )
    from .denoisers import (
        EquivariantLocalScore as EquivariantLocalScore,
    )
    from .denoisers import (
        KNNEstimator as KNNEstimator,
    )
    from .denoisers import (
        LocalScore as LocalScore,
    )
    from .denoisers import (
        Nearest as Nearest,
    )
    from .denoisers import (
        Optimal as Optimal,
    )
    from .denoisers import (
        PCALocality as PCALocality,
    )
    from .denoisers import (
        Posterior as Posterior,
    )
    from .denoisers import (
        PosteriorSampleDenoiser as PosteriorSampleDenoiser,
    )
    from .denoisers import (
        PSPCFlex as PSPCFlex,
    )
    from .denoisers import (
        Smoothed as Smoothed,
    )
    from .denoisers import (
        TopK as TopK,
    )
    from .denoisers import (
        Wiener as Wiener,
    )
    from .denoisers import (
        denoiser_options as denoiser_options,
    )
    from .denoisers import (
        make_denoiser as make_denoiser,
    )
    from .denoisers.patch_presets import (
        load_patch_schedule as load_patch_schedule,
    )
    from .denoisers.patch_schedule import (
        PatchSchedule as PatchSchedule,
    )
    from .grids import (
        SCHEDULES as SCHEDULES,
    )
    from .grids import (
        Schedule as Schedule,
    )
    from .grids import (
        get_schedule as get_schedule,
    )
    from .grids import (
        kamb_sigma as kamb_sigma,
    )
    from .grids import (
        karras as karras,
    )
    from .grids import (
        vp_cosine as vp_cosine,
    )
    from .grids import (
        vp_linear as vp_linear,
    )
    from .integrations import (
        to_diffusers as to_diffusers,
    )
    from .integrations import (
        to_edm as to_edm,
    )
    from .integrations import (
        to_smalldiffusion as to_smalldiffusion,
    )
    from .metrics import (
        mse as mse,
    )
    from .metrics import (
        pearson_r as pearson_r,
    )
    from .metrics import (
        r2 as r2,
    )
    from .metrics import (
        score_cosine as score_cosine,
    )
    from .metrics.memorization import (
        memorization as memorization,
    )
    from .metrics.novelty import (
        novelty as novelty,
    )
    from .networks import (
        CallableAdapter as CallableAdapter,
    )
    from .networks import (
        EDMAdapter as EDMAdapter,
    )
    from .networks import (
        VPAdapter as VPAdapter,
    )
    from .networks import (
        load_network as load_network,
    )
    from .networks import (
        train_network as train_network,
    )
    from .ops import (
        KeyBank as KeyBank,
    )
    from .ops import (
        PartialState as PartialState,
    )
    from .ops import (
        certified_retrieval as certified_retrieval,
    )
    from .ops import (
        combine_partials as combine_partials,
    )
    from .ops import (
        knn_search as knn_search,
    )
    from .ops import (
        softmax_retrieval as softmax_retrieval,
    )
    from .ops.distributed import (
        ShardError as ShardError,
    )
    from .ops.distributed import (
        ShardGroup as ShardGroup,
    )
    from .ops.distributed import (
        init_from_env as init_from_env,
    )
    from .sampling import (
        SAMPLERS as SAMPLERS,
    )
    from .sampling import (
        SampleResult as SampleResult,
    )
    from .sampling import (
        get_sampler as get_sampler,
    )
    from .sampling import (
        run_sample as run_sample,
    )
    from .sampling import (
        sample as sample,
    )
    from .sampling import (
        sample_ddim as sample_ddim,
    )
    from .sampling import (
        sample_ddpm as sample_ddpm,
    )
    from .sampling import (
        sample_euler as sample_euler,
    )
    from .sampling import (
        sample_heun as sample_heun,
    )
    from .sampling import (
        sample_teleported as sample_teleported,
    )
    from .sampling.parallel import (
        sample_parallel as sample_parallel,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'analytic_diffusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
