"""smalldiffusion's own modules, loaded from the installed package by file path.

``import smalldiffusion`` fails here: its __init__ imports smalldiffusion/data.py, which imports torchvision, and the
torchvision wheel matching torch 2.13 (0.28.0) does not import against the CPU torch build ("operator
torchvision::nms does not exist"). diffusion.py (Schedule*, samples) and model.py (ModelMixin, IdealDenoiser) do
not need torchvision (diffusion.py needs accelerate, model.py einops, both installed with --no-deps), so they are
loaded as standalone modules; the code that runs is the package's own.
"""

import importlib.util
import os


def load(name: str):
    """smalldiffusion.<name> ("diffusion" or "model") as a module, or None when smalldiffusion is not installed."""
    spec = importlib.util.find_spec("smalldiffusion")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), f"{name}.py")
    mod_spec = importlib.util.spec_from_file_location(f"_smalldiffusion_{name}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod
