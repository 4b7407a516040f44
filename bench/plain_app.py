"""The peer of ``bench/serve_load.py``: a plain FastAPI + uvicorn app doing the same forward pass as
``imclass serve`` (the same model file, the same test-time augmentation), without micro-batching, the
way a user would write it: a sync endpoint (FastAPI runs it in its thread pool), PIL to decode, one
forward per request, ``uvicorn.run``.

    python bench/plain_app.py RUN PORT [THREADS]
"""
import io
import sys

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

import imclass


def create(run: str) -> FastAPI:
    """The FastAPI app serving the model file / run folder ``run``."""
    clf = imclass.load(run, device="cpu")
    _, h, w = clf.input_size
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict:
        im = Image.open(io.BytesIO(file.file.read())).convert("RGB").resize((w, h), Image.BILINEAR)
        x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)  # (1, C, H, W)
        with torch.inference_mode():
            probs = clf.predict_proba(x, tta=None if clf.tta in (None, "none") else clf.tta)[0]
        i = int(probs.argmax())
        return {"predictions": [{"label": clf.classes[i], "top": [{"class": clf.classes[i], "probability": float(probs[i])}]}]}

    return app


if __name__ == "__main__":
    import uvicorn

    run, port = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    uvicorn.run(create(run), host="127.0.0.1", port=port, log_level="warning", access_log=False)
