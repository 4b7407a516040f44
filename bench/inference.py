"""Inference speed on the CPU: eager PyTorch, torch.compile and ONNX Runtime side by side, at batch 1 and 64,
for the fast recipe's FastNet (32x32) and the transfer backbone MobileNetV2 (224x224, the real ImageNet
weights from $IMCLASS_WEIGHTS when present).

What is timed is the deployed graph of `imclass export`: uint8 images (N, C, H, W) in, scaling +
normalisation + the network, logits out (no TTA), so the three engines run exactly the same computation;
their outputs are compared (max |difference| printed). Each figure is the median over repeated timed
runs after warm-up; torch.compile's compile time is printed separately. The process keeps freed memory
(``retain_freed_memory``, as ``imclass predict`` and ``serve`` do on a CPU; ``--no-retain``: glibc's default,
which page-faults every activation again). ``bf16`` (in ``--engines``): eager under bf16 autocast, for CPUs
that multiply bf16 natively (imclass's own inference stays float32 on a CPU).

    python bench/inference.py                       # both models, batches 1 and 64 (~3.5 min on 2 quiet cores,
                                                    # most of it torch.compile compiling)
    python bench/inference.py --models fastnet --seconds 1 --json /tmp/inference.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import full_strength_blas  # noqa: E402

full_strength_blas()  # before numpy/torch load: peers and imclass's own numpy work on the CPU's native BLAS kernel

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import LoadGuard, cpu_info, cpu_line, provenance  # noqa: E402

import imclass  # noqa: E402
from imclass.serve.export import Deployable, export  # noqa: E402
from imclass.serve.predictor import Predictor  # noqa: E402


def build(name: str, weights_root: Path) -> tuple[imclass.Classifier, str]:
    """The model as a saved-and-loadable Classifier, and where its weights came from."""
    if name == "fastnet":
        torch.manual_seed(0)
        clf = imclass.Classifier(imclass.models.create("fastnet"), mean=[0.4914, 0.4822, 0.4465],
                                 std=[0.2470, 0.2435, 0.2616])
        clf.input_size = (3, 32, 32)
        return clf, "random init (speed does not depend on the weights)"
    model = imclass.models.create("timm:mobilenetv2_100", num_classes=1000, pad_type="same")
    source = "random init"
    file = weights_root / "mobilenetv2_100-imagenet" / "model.safetensors"
    if file.is_file():
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(str(file)).items()})
        source = f"ImageNet weights {file}"
    clf = imclass.Classifier(model, mean=[0.5] * 3, std=[0.5] * 3)
    clf.input_size = (3, 224, 224)
    return clf, source


def median_rate(fn, x: torch.Tensor, seconds: float) -> float:
    """Images per second: the median of timed calls over about ``seconds`` (at least 3 calls)."""
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    return len(x) / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="fastnet,mobilenetv2_100")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per engine, model and batch")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per engine (1: on a shared machine two torch threads wait on each other)")
    parser.add_argument("--weights", default=os.environ.get("IMCLASS_WEIGHTS", "../shared/weights"))
    parser.add_argument("--engines", default="eager,compile,onnxruntime",
                        help="which to time (compile costs minutes of compilation on a busy machine)")
    parser.add_argument("--dynamic", action="store_true",
                        help="torch.compile once with a dynamic batch size (one compile per model instead of per batch)")
    parser.add_argument("--no-retain", action="store_true", help="leave glibc's malloc as it is (freed memory returned)")
    parser.add_argument("--json", help="write the figures here (rewritten after every row)")
    args = parser.parse_args()
    guard = LoadGuard(strict=False)  # load average before/after; a busy host marks the figures refused
    torch.set_num_threads(args.threads)
    if not args.no_retain:
        from imclass.train.memory import retain_freed_memory

        retain_freed_memory()
    print(cpu_line(), f"| torch threads {args.threads}, onnxruntime intra-op threads {args.threads}, "
          f"freed memory {'returned (glibc default)' if args.no_retain else 'kept (as imclass predict/serve)'}")
    import onnxruntime as ort

    batches = [int(b) for b in args.batches.split(",")]
    engines = set(args.engines.split(",")) | {"eager"}  # eager is the reference of every ratio
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            clf, source = build(name, Path(args.weights))
            run = imclass.save(clf, Path(tmp) / name)
            predictor = Predictor.load(run, tta=False)
            t0 = time.perf_counter()
            onnx_file = export(predictor, Path(tmp) / f"{name}.onnx")
            export_s = time.perf_counter() - t0
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
            eager = Deployable(clf.model.eval(), clf.mean, clf.std, "none").eval()
            compiled = torch.compile(eager, dynamic=True if args.dynamic else False)
            print(f"\n{name} {tuple(clf.input_size)}: {source}; ONNX export {export_s:.1f} s")

            def run_eager(x):
                with torch.inference_mode():
                    return eager(x)

            def run_compiled(x):
                with torch.inference_mode():
                    return compiled(x)

            def run_bf16(x):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return eager(x).float()

            def run_ort(x):
                return session.run(None, {"images": x.numpy()})[0]

            for batch in batches:
                x = torch.randint(0, 256, (batch, *clf.input_size), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(batch))
                ref = run_eager(x)
                compile_s, out_c = float("nan"), ref
                if "compile" in engines:
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out_c = run_compiled(x)  # compiles for this shape
                    compile_s = time.perf_counter() - t0
                out_o = torch.from_numpy(run_ort(x))
                out_b = run_bf16(x) if "bf16" in engines else ref
                rates = {}
                for engine, fn in (("eager", run_eager), ("compile", run_compiled), ("onnxruntime", run_ort),
                                   ("bf16", run_bf16)):
                    if engine not in engines:
                        rates[engine] = float("nan")
                        continue
                    fn(x)  # warm-up
                    rates[engine] = median_rate(fn, x, args.seconds)
                row = {"model": name, "input": list(clf.input_size), "batch": batch, "weights": source,
                       "images_per_s": {k: round(v, 1) for k, v in rates.items()},
                       "ratio_to_eager": {k: round(v / rates["eager"], 2) for k, v in rates.items()},
                       "compile_s": round(compile_s, 1),
                       "max_abs_diff": {"compile": float((out_c - ref).abs().max()),
                                        "onnxruntime": float((out_o - ref).abs().max()),
                                        "bf16": float((out_b - ref).abs().max())},
                       "retain_freed_memory": not args.no_retain}
                rows.append(row)
                print(f"  batch {batch:3d}: " + "   ".join(
                    f"{k} {v:8.1f} img/s ({row['ratio_to_eager'][k]:.2f}x)" for k, v in rates.items())
                    + f"   | compile {compile_s:.0f} s | max|diff| compile {row['max_abs_diff']['compile']:.1e},"
                    f" ort {row['max_abs_diff']['onnxruntime']:.1e}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"host": provenance(guard.before), "load": guard.check(), "cpu": cpu_info(), "threads": args.threads,
                                                           "dynamic": args.dynamic, "rows": rows}, indent=2))
    print("\nmodel             batch     eager    compile            onnxruntime        bf16 autocast"
          "   (images/s; ratio to eager)")
    for r in rows:
        ips, ratio = r["images_per_s"], r["ratio_to_eager"]
        print(f"{r['model']:17} {r['batch']:5d} {ips['eager']:9.1f} {ips['compile']:9.1f} ({ratio['compile']:.2f}x)"
              f" {ips['onnxruntime']:9.1f} ({ratio['onnxruntime']:.2f}x) {ips['bf16']:9.1f} ({ratio['bf16']:.2f}x)")


if __name__ == "__main__":
    main()
