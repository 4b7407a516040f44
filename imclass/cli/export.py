"""``imclass export``: a saved model as ONNX (onnxruntime) or TorchScript, preprocessing included."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from imclass.cli._common import USER_ERRORS, TTAOption, fail, print_json

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.


def register(app: typer.Typer) -> None:
    """Add the top-level command ``export`` to ``app``."""
    app.command("export")(export)


def export(
    run: Path = typer.Argument(..., help="Run folder or .safetensors model file."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File to write (default: <run>/model.onnx or model.pt)."),
    tta: Optional[bool] = TTAOption,
    check: bool = typer.Option(True, "--check/--no-check", help="Compare the export with PyTorch on sample images."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Write a model as ONNX or TorchScript taking uint8 images (N, C, H, W): scaling, normalisation and
    the recorded test-time augmentation are inside; class names and preprocessing in its metadata."""
    from imclass.serve.export import EXPORT_FORMATS, export as export_model
    from imclass.serve.predictor import Predictor

    fmt = fmt.lower()
    if fmt not in EXPORT_FORMATS:
        fail(f"expected --format in {list(EXPORT_FORMATS)}, received --format {fmt}")
    if out is None:
        folder = run if run.is_dir() else run.parent
        out = folder / ("model.onnx" if fmt == "onnx" else "model.pt")
    try:
        predictor = Predictor.load(run, tta=tta)
        path = export_model(predictor, out, format=fmt)
        diff = _check(predictor, path, fmt) if check else None
    except USER_ERRORS as err:
        fail(str(err))
    report = {"out": str(path), "format": fmt, "kind": predictor.kind, "tta": predictor.tta,
              "bytes": path.stat().st_size, "max_abs_diff": diff}
    if as_json:
        print_json(report)
    else:
        checked = f"; matches PyTorch within {diff:.1e} on 8 images" if diff is not None else ""
        typer.echo(f"wrote {path} ({fmt}, {report['bytes'] / 1e6:.1f} MB, tta {predictor.tta}{checked})")


def _check(predictor, path: Path, fmt: str) -> float:
    """Largest |exported - PyTorch| over 8 random uint8 images (probabilities for a k-NN, logits otherwise)."""
    import torch

    from imclass.serve.export import deployable

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, *predictor.input_size), dtype=torch.uint8, generator=gen)
    module, _ = deployable(predictor)
    with torch.no_grad():
        ref = module(x).float()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    else:
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation note
            got = torch.jit.load(str(path))(x).float()
    diff = float((got - ref).abs().max())
    if diff > 1e-4:
        raise ValueError(f"{path}: the export differs from PyTorch by {diff:.2e} (> 1e-4)")
    return diff
