"""Pictures: image grids and nearest-neighbour panels (images), line plots and figures (plots, matplotlib)."""

from .images import save_grid, save_nearest_panel, save_x0_strips, tile, to_uint8

__all__ = ["save_grid", "save_nearest_panel", "save_x0_strips", "tile", "to_uint8"]
