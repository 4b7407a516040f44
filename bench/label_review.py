"""Label review: does confident learning in imclass find flipped labels as well as cleanlab, and does
removing (or correcting) what it finds win accuracy back?

Subcommands (each writes one JSON with the host's provenance: commit, CPU, versions, threads, BLAS,
load average before and after, date):

* ``noise``: flip ``--noise`` shares (default 5 % and 20 %) of the labels, seeded, to another class
  drawn uniformly; get out-of-sample probabilities ONCE per noise level (``--data flowers``: 5-fold
  logistic regression on cached MobileNetV2 features; ``--data cifar10``: ``--folds`` fast-recipe
  networks on the first ``--limit`` training images); then, on those SAME probabilities, side by side:
  imclass (``find_label_issues``, prune_by_noise_rate, ranked by self-confidence and by normalised
  margin), cleanlab's ``find_label_issues`` (same filter and ranking), and ranking by loss alone.
  Figures: precision at the true noise count (top-K, K = number flipped: each method's flagged images
  first, ranked, then the rest by its quality score), and the flagged set's precision and recall.
  With ``--retrain`` (cifar10): the fast recipe trained on the noisy labels, on the noisy labels minus
  imclass's flagged images, and with those images relabelled to the suggested class; test accuracy on
  all 10,000 test images, per ``--seeds``.
* ``real``: review the real flowers folder (no injected noise) and save the top 30 as a picture grid
  (``--grid``) to look at.
* ``time``: wall time of ``imclass review FOLDER`` (a fresh process, features cached) interleaved
  with cleanlab's ``find_label_issues`` on the same probabilities, ABAB, ``--rounds`` (needs a quiet host).

    python bench/label_review.py noise --data flowers --json bench/label_review_flowers.json
    nice python bench/label_review.py noise --data cifar10 --limit 10000 --folds 4 --retrain --seeds 0 1 \
        --json bench/label_review_cifar10.json
    python bench/label_review.py real --grid bench/label_review_flowers_top30.jpg --json bench/label_review_real.json
    python bench/label_review.py time --rounds 3 --json bench/label_review_time.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402

if __name__ == "__main__":
    host.full_strength_blas()  # before numpy: the peer (and scikit-learn in imclass) at full strength

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("IMCLASS_DATA", ROOT.parent / "shared" / "data"))
FLOWERS = DATA / "flowers" / "photos"


def provenance() -> dict:
    """Where and how the figures were taken: commit, CPU and flags, versions, BLAS kernels, threads, load."""
    return host.provenance()


def flip(labels: np.ndarray, share: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, indices flipped): ``round(share * n)`` images, each to another class drawn uniformly."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(labels), size=int(round(share * len(labels))), replace=False))
    noisy = labels.copy()
    noisy[idx] = (labels[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    return noisy, idx


def _ranked(flagged: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Flagged images first (in their order), then every other image by ascending quality."""
    rest = np.setdiff1d(np.argsort(quality, kind="stable"), flagged, assume_unique=False)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    return np.concatenate([flagged, rest])


def scores(name: str, ranked: np.ndarray, flagged: np.ndarray | None, flipped: np.ndarray, seconds: float) -> dict:
    """Precision at K = |flipped| of the ranking; precision and recall of the flagged set."""
    truth = set(flipped.tolist())
    k = len(truth)
    row = {"method": name, "precision_at_k": len(set(ranked[:k].tolist()) & truth) / max(k, 1), "k": k,
           "seconds": seconds}
    if flagged is not None:
        hit = len(set(flagged.tolist()) & truth)
        row.update(flagged=len(flagged), precision=hit / max(len(flagged), 1), recall=hit / max(k, 1))
    return row


def compare(probs: np.ndarray, noisy: np.ndarray, flipped: np.ndarray) -> list[dict]:
    """imclass, cleanlab and loss ranking on the same probabilities."""
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    from imclass.confident import find_label_issues, label_quality

    rows = []
    for rank_by in ("self_confidence", "normalized_margin"):
        t = time.perf_counter()
        found = find_label_issues(probs, noisy, filter_by="prune_by_noise_rate", rank_by=rank_by)
        ranked = _ranked(found.indices, label_quality(probs, noisy, rank_by))
        rows.append(scores(f"imclass ({rank_by})", ranked, found.indices, flipped, time.perf_counter() - t))
        t = time.perf_counter()
        flagged = cl_find(noisy, probs, filter_by="prune_by_noise_rate", return_indices_ranked_by=rank_by)
        ranked = _ranked(np.asarray(flagged), get_label_quality_scores(noisy, probs, method=rank_by))
        rows.append(scores(f"cleanlab ({rank_by})", ranked, np.asarray(flagged), flipped, time.perf_counter() - t))
    loss = -np.log(np.clip(probs[np.arange(len(noisy)), noisy], 1e-12, 1))
    rows.append(scores("loss alone", np.argsort(-loss, kind="stable"), None, flipped, 0.0))
    return rows


# ------------------------------------------------------------------------------ data

def flowers_features() -> tuple[torch.Tensor, np.ndarray, list[str], list[Path]]:
    from imclass.review.find import ReviewConfig, folder_features, folder_items

    items = folder_items(FLOWERS.resolve(), "all")
    feats, _ = folder_features(ReviewConfig(data=str(FLOWERS), verbose=True), items)
    return feats, items.labels.numpy(), items.classes, items.paths


def cifar(limit: int):
    from imclass.data import load

    train, test = load("cifar10", split="train"), load("cifar10", split="test")
    return train.subset(slice(0, limit)) if limit < len(train) else train, test


def fast_accuracy(train, test, seed: int, **overrides) -> float:
    from imclass.workflows.recipes import fast_config, fast_recipe

    clf = fast_recipe(train, fast_config(90, **overrides), seed=seed, verbose=False)
    return float(clf.evaluate(test, tta=clf.tta)["accuracy"])


def fast_overrides(args) -> dict:
    """Fast-recipe overrides for a quick check of the script (--epochs, --widths)."""
    out = {}
    if args.epochs:
        out["epochs"] = args.epochs
    if args.widths:
        out["widths"] = tuple(int(w) for w in args.widths.split(","))
    return out


def noise(args) -> dict:
    from imclass.data.dataset import ImageDataset
    from imclass.confident import find_label_issues
    from imclass.review.oof import cross_val_features, cross_val_images

    result = {"host_before": provenance(), "args": vars(args), "levels": []}
    if args.data == "flowers":
        feats, labels, classes, _ = flowers_features()
    else:
        train, test = cifar(args.limit)
        labels, classes = train.labels.numpy(), train.classes
    for share in args.noise:
        noisy, flipped = flip(labels, share, len(classes), args.noise_seed)
        start = time.perf_counter()
        if args.data == "flowers":
            probs = cross_val_features(feats, torch.from_numpy(noisy), len(classes), folds=args.folds, verbose=True)
        else:
            noisy_set = ImageDataset(train.images, torch.from_numpy(noisy), classes, split="train")
            probs = cross_val_images(noisy_set, folds=args.folds, verbose=True, **fast_overrides(args))
        level = {"noise": share, "images": len(labels), "flipped": len(flipped),
                 "probabilities_seconds": time.perf_counter() - start,
                 "out_of_sample_accuracy_vs_given": float((probs.argmax(1) == noisy).mean()),
                 "out_of_sample_accuracy_vs_true": float((probs.argmax(1) == labels).mean()),
                 "methods": compare(probs, noisy, flipped)}
        for row in level["methods"]:
            print(f"noise {share:.0%}: {row['method']:<32} precision@{row['k']} {row['precision_at_k']:.3f}"
                  + (f"  flagged {row['flagged']} precision {row['precision']:.3f} recall {row['recall']:.3f}"
                     if "flagged" in row else ""), flush=True)
        if args.retrain and args.data == "cifar10":
            found = find_label_issues(probs, noisy)
            keep = np.setdiff1d(np.arange(len(noisy)), found.indices)
            corrected = noisy.copy()
            corrected[found.indices] = found.suggested
            runs = []
            for seed in args.seeds:
                row = {"seed": seed}
                for name, images, y in (("noisy", train.images, noisy),
                                        ("without flagged", train.images[torch.from_numpy(keep)], noisy[keep]),
                                        ("flagged relabelled", train.images, corrected),
                                        ("clean (reference)", train.images, labels)):
                    if name == "clean (reference)" and not args.clean_reference:
                        continue
                    t = time.perf_counter()
                    ds = ImageDataset(images, torch.from_numpy(np.ascontiguousarray(y)), classes, split="train")
                    row[name] = fast_accuracy(ds, test, seed, **fast_overrides(args))
                    print(f"  seed {seed} {name:<20} test accuracy {row[name]:.4f} ({time.perf_counter() - t:.0f} s)",
                          flush=True)
                runs.append(row)
            level["retrain"] = {"recipe": "fast, target 90", "train_images": len(noisy), "test_images": len(test),
                                "flagged": len(found.indices), "runs": runs}
        result["levels"].append(level)
        _write(args.json, result)
    result["host_after"] = provenance()
    return result


def real(args) -> dict:
    from imclass.review.find import ReviewConfig, review

    start = time.perf_counter()
    res = review(ReviewConfig(data=str(FLOWERS), verbose=True))
    seconds = time.perf_counter() - start
    top = res.issues[:30]
    if args.grid:
        from PIL import Image, ImageDraw

        from imclass.review.page import thumbnail  # noqa: F401 (same decoding as the page)

        cell, cols = 200, 6
        sheet = Image.new("RGB", (cols * cell, ((len(top) + cols - 1) // cols) * (cell + 30)), "white")
        draw = ImageDraw.Draw(sheet)
        for n, issue in enumerate(top):
            with Image.open(res.paths[issue["index"]]) as im:
                im = im.convert("RGB")
                im.thumbnail((cell, cell))
                x, y = (n % cols) * cell, (n // cols) * (cell + 30)
                sheet.paste(im, (x, y))
                draw.text((x + 2, y + cell + 2), f"{n + 1}. {issue['given']}->{issue['suggested']} {issue['kind'][:3]}",
                          fill="black")
        sheet.save(args.grid)
    return {"host": provenance(), "seconds": seconds, "images": res.images, "method": res.method,
            "estimated_label_errors": res.estimated_label_errors,
            "counts": res.to_dict()["counts"], "top30": top}


def timing(args) -> dict:
    """A whole ``imclass review`` of the flowers folder (a fresh process, features cached) interleaved with
    cleanlab's ``find_label_issues`` on the same folder's out-of-sample probabilities; refused on a busy host."""
    from cleanlab.filter import find_label_issues as cl_find

    from imclass.review.oof import cross_val_features

    feats, labels, classes, _ = flowers_features()  # warms the cache the timed runs read
    probs = cross_val_features(feats, torch.from_numpy(labels), len(classes))
    out = ROOT / "runs" / "bench-review"
    command = [sys.executable, "-m", "imclass", "review", str(FLOWERS), "--out", str(out), "--json"]
    guard = host.LoadGuard(cores=args.cores, strict=not args.allow_busy)
    figures = host.interleave({
        "imclass review (whole: read, features from cache, 5-fold CV, confident learning, outliers, duplicates, page)":
            lambda: subprocess.run(command, check=True, capture_output=True, env=host.clean_env(), cwd=ROOT),
        "cleanlab find_label_issues (same probabilities)":
            lambda: len(cl_find(labels, probs, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence")),
    }, rounds=args.rounds, on_round=lambda r, t: print(f"round {r + 1}: " + "; ".join(f"{k[:40]} {v:.2f} s" for k, v in t.items()), flush=True))
    for v in figures.values():
        v.pop("result", None)
    status = guard.check()
    return {"host": provenance(), "load": status, "images": len(labels), "command": " ".join(command[1:]),
            "times": figures}


def _write(path: str | None, obj: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=float) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["noise", "real", "time"])
    p.add_argument("--data", choices=["flowers", "cifar10"], default="flowers")
    p.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.2])
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--limit", type=int, default=50000, help="cifar10: the first N training images")
    p.add_argument("--retrain", action="store_true", help="cifar10: retrain without / with corrected flagged images")
    p.add_argument("--clean-reference", action="store_true", help="also train on the true labels")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cores", type=int, default=2, help="time: cores in use (the load guard's limit)")
    p.add_argument("--allow-busy", action="store_true", help="time: record figures on a busy host (marked refused)")
    p.add_argument("--epochs", type=float, default=None, help="fast-recipe epochs (quick checks; default the recipe's)")
    p.add_argument("--widths", default=None, help="fast-recipe widths, e.g. 8,16,16 (quick checks)")
    p.add_argument("--grid", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(host.cpu_line(), flush=True)
    result = {"noise": noise, "real": real, "time": timing}[args.what](args)
    _write(args.json, result)


if __name__ == "__main__":
    main()
