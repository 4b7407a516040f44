"""Pictures of data and models: image grids, curves, filters, saliency maps."""
from __future__ import annotations

from imclass.visualize.images import save_image_grid
from imclass.visualize.plots import save_line_plot

__all__ = ["save_image_grid", "save_line_plot"]
