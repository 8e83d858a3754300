"""Triton kernels, installed as ``analytic_diffusion.kernels``.

They implement backends only (docs/design.md §4) and never import denoisers. The global-retrieval and
patch kernels arrive with their own issues; until then ``ops`` offers the ``torch`` and ``cpu`` backends.
"""
