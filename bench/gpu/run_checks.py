"""The GPU checks for a lent NVIDIA GPU, in one run: the CUDA tests, then imclass's fast recipe (target 94) and
the published airbench94 script side by side (interleaved rounds), figures into one self-describing JSON.

    bench/gpu/run_checks.sh /path/to/airbench94.py [--rounds 3] [--json bench/gpu/checks.json]

airbench94.py is Keller Jordan's published script: https://github.com/KellerJordan/cifar10-airbench
(file ``airbench94.py``; the machine lent here reaches no network, so fetch it beforehand and pass its
path). It normally downloads CIFAR-10 through torchvision; this script writes the ``cifar10/train.pt`` /
``test.pt`` files it caches from the shared ``$IMCLASS_DATA/cifar10/cifar10.npz`` (the same 50,000 / 10,000
images imclass uses), so nothing is downloaded. Each round runs imclass (``bench/fast.py --target 94
--device cuda``, one seed) and airbench94 (its own runs, as published) in turn, A B B A ...; both print
their accuracy on all 10,000 test images. The JSON holds the host provenance (``bench/host.py``), the
test outcome and every run's accuracy and wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import host  # noqa: E402


def run_tests(env: dict) -> dict:
    """tests/test_gpu.py and its outcome per test (-rA: every pass, failure and skip with its reason). Not
    under CI=true: a lent GPU machine need not hold the browser, photos and weights the whole suite requires."""
    start = time.time()
    clean = {k: v for k, v in env.items() if k not in ("CI", "IMCLASS_TEST_STRICT")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-rA", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=clean, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASSED", "FAILED", "SKIP", "ERROR"))]
    print(proc.stdout[-3000:], file=sys.stderr)
    return {"returncode": proc.returncode, "seconds": time.time() - start, "outcomes": lines,
            "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def airbench_data(folder: Path, data_root: Path) -> None:
    """airbench's torchvision cache files (uint8 HWC images, int labels) from the shared CIFAR-10 arrays."""
    import numpy as np
    import torch

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(data_root / "cifar10" / "cifar10.npz", allow_pickle=False) as z:
        for split, key in (("train", "train"), ("test", "test")):
            torch.save({"images": torch.from_numpy(z[f"x_{key}"]), "labels": torch.from_numpy(z[f"y_{key}"].astype("int64")),
                        "classes": classes}, folder / f"{split}.pt")


def run_imclass(seed: int, env: dict, out: Path) -> dict:
    result = out / f"imclass_seed{seed}.json"
    start = time.time()
    proc = subprocess.run([sys.executable, "bench/fast.py", "--target", "94", "--seeds", str(seed), "--device", "cuda",
                           "--no-baseline", "--json", str(result)], cwd=ROOT, env=env, capture_output=True, text=True)
    row = {"seed": seed, "returncode": proc.returncode, "wall_seconds": time.time() - start,
           "tail": proc.stdout[-1500:] + proc.stderr[-1500:]}
    if proc.returncode == 0 and result.is_file():
        row["summary"] = json.loads(result.read_text())
    return row


def run_airbench(script: Path, cwd: Path, env: dict) -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    # the script prints a table row per run with its test accuracy, then the mean: every 0.8x-0.9x number on a
    # line that mentions accuracy or sits in the table is kept (the raw tail is stored to check the parse)
    accs = [float(v) for v in re.findall(r"(?<![\d.])(0\.9\d{2,4}|0\.8\d{2,4})(?![\d.])", text)]
    return {"returncode": proc.returncode, "wall_seconds": time.time() - start, "accuracies_seen": accs,
            "tail": text[-4000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("airbench", type=Path, help="path of the published airbench94.py (see the docstring)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of imclass and airbench94 (>= 3)")
    ap.add_argument("--json", type=Path, default=BENCH / "gpu" / "checks.json")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("IMCLASS_DATA", ROOT.parent / "shared" / "data")))
    args = ap.parse_args()
    if not args.airbench.is_file():
        raise SystemExit(f"no airbench94 script at {args.airbench}: fetch airbench94.py from "
                         "https://github.com/KellerJordan/cifar10-airbench and pass its path")
    if not (args.data / "cifar10" / "cifar10.npz").is_file():
        raise SystemExit(f"no CIFAR-10 at {args.data / 'cifar10' / 'cifar10.npz'}: set IMCLASS_DATA")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a machine with an NVIDIA GPU")
    env = {**os.environ, "IMCLASS_DATA": str(args.data), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    figures: dict = {"gpu": torch.cuda.get_device_name(0), "torch_cuda": torch.version.cuda,
                     "airbench_script": str(args.airbench)}
    if not args.skip_tests:
        figures["tests"] = run_tests(env)
    work = Path(tempfile.mkdtemp(prefix="airbench-"))
    airbench_data(work / "cifar10", args.data)
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = ("imclass", "airbench94") if r % 2 == 0 else ("airbench94", "imclass")
        row = {}
        for name in order:
            row[name] = run_imclass(r, env, work) if name == "imclass" else run_airbench(args.airbench, work, env)
            print(f"round {r} {name}: rc {row[name]['returncode']}, {row[name]['wall_seconds']:.1f} s", file=sys.stderr)
        rounds.append(row)
    figures["rounds"] = rounds
    ours = [r["imclass"]["summary"]["runs"][0]["accuracy"] for r in rounds
            if "summary" in r["imclass"] and r["imclass"]["summary"].get("runs")]
    figures["imclass_accuracies"] = ours
    host.write_result(args.json, figures)
    print(f"written {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
