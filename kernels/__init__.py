"""Triton kernels, installed as ``analytic_diffusion.kernels``.

They implement backends only (docs/design.md §4) and never import denoisers: the global retrieval
(split-N with a fused top-k, two-pass GEMMs; global_retrieval.py), the patch softmax of LS / ELS / bbELS / PSPC
(patch_retrieval.py) and pca_locality's per-coordinate softmax (coordinate_retrieval.py). ``ops`` launches them.
"""
