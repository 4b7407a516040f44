"""Seeing inside a model: first-layer filters, activation maps, Grad-CAM, gradient saliency and
occlusion sensitivity (attributions by Captum), nearest neighbours in feature vs pixel space, a
t-SNE map of features, and the course's "same L2 distance" picture. Every model kind ``imclass.load``
returns works where the method makes sense (a k-NN has no layers: occlusion, neighbours, tsne, same-l2).
"""
from __future__ import annotations

from imclass.explain.attributions import Explanation, gradcam, occlusion, saliency
from imclass.explain.inside import activations, filter_images, save_activations, save_filters
from imclass.explain.space import neighbours, same_l2, tsne_map

__all__ = ["Explanation", "gradcam", "saliency", "occlusion", "filter_images", "save_filters", "activations",
           "save_activations", "neighbours", "tsne_map", "same_l2", "METHODS"]

METHODS = ("gradcam", "saliency", "occlusion", "filters", "activations", "neighbours", "tsne", "same-l2")
