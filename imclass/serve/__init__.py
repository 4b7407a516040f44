"""Serving a trained model: batch prediction (``predictor``), the REST service with its web page
(``app``, ``batching``) and export to ONNX / TorchScript (``export``)."""
from imclass.serve.predictor import DEFAULT_MAX_PIXELS, ImageError, Predictor, decode_image, find_images

__all__ = ["DEFAULT_MAX_PIXELS", "ImageError", "Predictor", "decode_image", "find_images"]
