"""Benchmarks behind ``analytic-diffusion bench``: PyTorch baselines, roofline floors, side-by-side runners."""

from .global_bench import markdown_table, run_global_bench

__all__ = ["markdown_table", "run_global_bench"]
