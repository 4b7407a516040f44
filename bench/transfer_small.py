"""Transfer without downloaded weights, with figures: a small timm network pretrained on CIFAR-10 with
imclass, saved, loaded through the weights-file path and transferred to Fashion-MNIST with few images
per class, side by side with the same network from random weights (same recipe, same cost) and with
the whole network trained from scratch for many more epochs.

    .venv/bin/python bench/transfer_small.py [--per-class 20] [--seeds 3] [--json bench/transfer_small.json]

Times are CPU seconds of this process (user + system), so that a machine shared with other jobs
still gives comparable figures; wall seconds are printed too.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import full_strength_blas  # noqa: E402

full_strength_blas()  # before numpy/torch load: peers and imclass's own numpy work on the CPU's native BLAS kernel

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import cpu_info, cpu_line, provenance  # noqa: E402

from imclass import models  # noqa: E402
from imclass.data import load  # noqa: E402
from imclass.io import save  # noqa: E402
from imclass.models.weights import Preprocessing  # noqa: E402
from imclass.train import Classifier  # noqa: E402
from imclass.transfer import fine_tune, transfer  # noqa: E402
from imclass.transfer.finetune import resize_for  # noqa: E402

ARCH = "timm:test_resnet"
SIZE = Preprocessing(input_size=(3, 32, 32), resize=32, crop=32)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="data root (default $IMCLASS_DATA)")
    ap.add_argument("--pretrain-images", type=int, default=3000)
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--head-epochs", type=int, default=30)
    ap.add_argument("--scratch-epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_line())

    cifar = load("cifar10", "train", root=args.data).subset(slice(0, args.pretrain_images))
    t0, w0 = cpu_seconds(), time.perf_counter()
    torch.manual_seed(0)
    pre_clf = Classifier(models.create(ARCH, num_classes=10), device="cpu").compile("adam", lr=2e-3)
    pre_clf.fit(cifar, epochs=args.pretrain_epochs, batch_size=64, seed=0, verbose=False)
    pretrain = {"cpu_s": cpu_seconds() - t0, "wall_s": time.perf_counter() - w0,
                "cifar_test_accuracy": pre_clf.evaluate(load("cifar10", "test", root=args.data).subset(slice(0, 2000)))["accuracy"]}
    path = save(pre_clf, Path("/tmp") / "imclass_transfer_small.safetensors")
    print(f"pretrain: {ARCH} on {args.pretrain_images:,} CIFAR-10 images, {args.pretrain_epochs} epochs: "
          f"{pretrain['cpu_s']:.1f} CPU s, CIFAR-10 test accuracy {pretrain['cifar_test_accuracy']:.1%}; saved {path}")

    train, test = load("fashion-mnist", "train", root=args.data), load("fashion-mnist", "test", root=args.data)
    rgb = lambda im: resize_for(im.expand(-1, 3, -1, -1).contiguous(), SIZE)  # grey 28x28 -> RGB 32x32
    idx = torch.cat([torch.nonzero(train.labels == c).flatten()[: args.per_class] for c in range(10)])
    few = (rgb(train.images[idx]), train.labels[idx])
    held = (rgb(test.images[: args.test_images]), test.labels[: args.test_images])
    random_pre = Preprocessing(input_size=(3, 32, 32), resize=32, crop=32, mean=tuple(pre_clf.mean), std=tuple(pre_clf.std))
    runs = {
        "pretrained: frozen features + head": dict(weights=str(path), freeze_epochs=args.head_epochs, epochs=0),
        "random init: frozen features + head": dict(weights=None, freeze_epochs=args.head_epochs, epochs=0),
        f"from scratch: whole network, {args.scratch_epochs} epochs": dict(weights=None, freeze_epochs=0,
                                                                          epochs=args.scratch_epochs),
    }
    results: dict[str, dict] = {}
    for name, run in runs.items():
        accs, cpus = [], []
        for seed in range(args.seeds):
            t0 = cpu_seconds()
            torch.manual_seed(seed)
            model = transfer(ARCH, 10, weights=run["weights"], head="linear", input_size=32)
            if run["weights"] is None:
                model.preprocessing = random_pre
            result = fine_tune(model, few, epochs=run["epochs"], freeze_epochs=run["freeze_epochs"], seed=seed, amp=None)
            accs.append(result.classifier.evaluate(held)["accuracy"])
            cpus.append(cpu_seconds() - t0)
        results[name] = {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                         "accuracies": accs, "cpu_s_mean": float(np.mean(cpus))}

    base = results["pretrained: frozen features + head"]
    print(f"\nFashion-MNIST, {args.per_class} training images per class, {args.test_images:,} test images, "
          f"{args.seeds} seeds:")
    print(f"  {'run':<44}{'accuracy':>18}{'CPU s':>8}{'vs pretrained':>16}")
    for name, r in results.items():
        ratio = f"{r['accuracy_mean'] / base['accuracy_mean']:.2f}x acc" if name != "pretrained: frozen features + head" else ""
        cost = f", {r['cpu_s_mean'] / base['cpu_s_mean']:.1f}x CPU" if ratio else ""
        print(f"  {name:<44}{r['accuracy_mean']:>11.1%} ± {r['accuracy_std']:.1%}{r['cpu_s_mean']:>8.1f}  {ratio}{cost}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": provenance(), "cpu": cpu_info(), "arch": ARCH, "args": vars(args),
                                               "pretrain": pretrain, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
