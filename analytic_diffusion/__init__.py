"""analytic-diffusion: exact, fast training-free (analytic) diffusion denoisers, samplers and kernels.

    import analytic_diffusion as ad
    ds = ad.load_dataset("mnist")
    result = ad.sample(ad.make_denoiser("optimal", ds), n=16, steps=18, sampler="heun", seed=0)
"""
import importlib

__version__ = "0.1.0"

# Public names -> defining module, imported on first use so that `import analytic_diffusion` stays cheap.
_EXPORTS = {
    "Dataset": "data", "load_dataset": "data",
    "DENOISERS": "denoisers", "make_denoiser": "denoisers",
    "memorization": "metrics",
    "sample": "sampling", "SampleResult": "sampling",
    "get_schedule": "schedules",
    "run_sample": "run",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'analytic_diffusion' has no attribute {name!r}")
