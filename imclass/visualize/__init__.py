"""Pictures of data and models: image grids, curves, filters, saliency maps."""
from __future__ import annotations

from imclass.visualize.images import save_image_grid
from imclass.visualize.plots import save_figure, save_line_plot
from imclass.visualize.training import save_confusion_matrix, save_curves

__all__ = ["save_confusion_matrix", "save_curves", "save_figure", "save_image_grid", "save_line_plot"]
