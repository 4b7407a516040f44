"""Model files (public face: it re-exports). ``imclass.save`` / ``imclass.load``::

    imclass.save(clf, "runs/x/model.safetensors")
    clf = imclass.load("runs/x")            # a run folder or the file itself

The format (one ``.safetensors`` file, the JSON header under the metadata key ``imclass``) is
described and read in ``imclass.model_file.format``; ``save`` is ``imclass.model_file.save``;
``load`` rebuilds the object in ``imclass.models.rebuild``.
"""
from __future__ import annotations

from imclass.model_file.format import (
    FORMAT_VERSION,
    KINDS,
    METADATA_KEY,
    MODEL_FILENAME,
    TORCH_SUFFIXES,
    ModelFileError,
    load_weights,
    read_metadata,
)
from imclass.model_file.save import save
from imclass.models.rebuild import load

__all__ = ["FORMAT_VERSION", "ModelFileError", "load", "load_weights", "read_metadata", "save"]
