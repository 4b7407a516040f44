"""k-NN on full CIFAR-10: imclass against scikit-learn's brute-force KNeighborsClassifier, side by side.

Four parts, on the same data for both libraries:

1. accuracy: the 1,000 official test images as queries against all 50,000 training images, for L1 and
   L2 and every k (one imclass search for the largest k serves every k); scikit-learn's 1-NN runs on the
   same queries (L1: on the first ``--sk-l1-test`` of them, its L1 is slow) and the predictions are compared.
2. speed: 10,000 queries = training images 40000-49999 against training images 0-39999 (the shared data
   holds only 1,000 test images), 1-NN. scikit-learn's L1 is far too slow for all 10,000 queries: it
   runs on the first ``--sk-l1-queries`` of them and its time is scaled up linearly (said in the output).
3. choosing k: the same 10,000 queries as a validation split (train 0-39999, validate 40000-49999):
   accuracy for every k from one search for the largest k, timed. ``--folds 5`` adds 5-fold
   cross-validation on all 50,000 training images (5 more full searches per metric).
4. backends: imclass's torch, numba and faiss backends timed on the first ``--backend-queries`` queries.

scikit-learn gets its fastest input: float64 for L2 (its ArgKmin GEMM path), uint8 for L1 (float input
is about twice as slow there). Run it alone: every part uses every core.

    python bench/knn.py                  # the full run (several minutes on 2 cores)
    python bench/knn.py --quick          # the same on a slice of the data, to check the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

from imclass.knn import KNN, choose_k

SK_METRIC = {"l1": "manhattan", "l2": "euclidean"}
SK_DTYPE = {"l1": np.uint8, "l2": np.float64}


def load_cifar(root: Path):
    with np.load(root / "cifar10" / "cifar10.npz", allow_pickle=False) as z:
        x, y, xt, yt = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    # flat rows; the feature order does not change L1/L2 distances
    return x.reshape(len(x), -1), y.astype(np.int64), xt.reshape(len(xt), -1), yt.astype(np.int64)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sklearn_predict(metric: str, k: int, x, y, q):
    dt = SK_DTYPE[metric]
    model = KNeighborsClassifier(k, algorithm="brute", metric=SK_METRIC[metric]).fit(x.astype(dt), y)
    return timed(lambda: model.predict(q.astype(dt)))


def accuracy_part(x, y, xt, yt, ks, metrics, sk: bool, sk_test: dict) -> dict:
    print(f"\n== accuracy: {len(xt)} official test images vs {len(x)} training images ==")
    out = {}
    for metric in metrics:
        model = KNN(max(ks), metric=metric).fit(x, y)
        scores, seconds = timed(lambda: model.score_each_k(xt, yt, ks))
        acc = dict(zip(sorted(set(ks)), scores))
        row = {"imclass_seconds": seconds, "accuracy_by_k": acc, "backend": model.backend_}
        line = ", ".join(f"k={k}: {a:.2%}" for k, a in acc.items())
        print(f"{metric}: imclass {seconds:.1f} s for the {max(ks)} nearest of each and the votes ({model.backend_}); {line}")
        if sk:
            n_sk = min(sk_test[metric], len(xt))
            (sk_pred, sk_s) = sklearn_predict(metric, 1, x, y, xt[:n_sk])
            ours = KNN(1, metric=metric).fit(x, y).predict(xt[:n_sk]).numpy()
            agree = int((sk_pred == ours).sum())
            row |= {"sklearn_1nn_seconds": sk_s, "sklearn_1nn_accuracy": float((sk_pred == yt[:n_sk]).mean()),
                    "sklearn_test_images": n_sk, "1nn_agree": agree,
                    "imclass_1nn_accuracy_same_images": float((ours == yt[:n_sk]).mean())}
            print(f"    scikit-learn 1-NN on the first {n_sk} test images: {sk_s:.1f} s, accuracy "
                  f"{(sk_pred == yt[:n_sk]).mean():.2%} (imclass {(ours == yt[:n_sk]).mean():.2%}); "
                  f"predictions agree on {agree}/{n_sk}")
        out[metric] = row
    return out


def speed_part(x, y, k: int, metrics, n_query: int, sk_queries: dict, sk: bool, split: int = 40000) -> dict:
    q, train, ytrain = x[split:split + n_query], x[:split], y[:split]
    print(f"\n== speed: {len(q)} queries (training images {split}-{split + len(q) - 1}) vs training images "
          f"0-{split - 1}, {k}-NN ==")
    out = {}
    for metric in metrics:
        model = KNN(k, metric=metric).fit(train, ytrain)
        model.predict(q[:8])  # compile / warm up outside the timing
        ours, seconds = timed(lambda: model.predict(q).numpy())
        row = {"imclass_seconds": seconds, "backend": model.backend_, "queries": len(q)}
        print(f"{metric}: imclass {seconds:.1f} s ({model.backend_})")
        if sk:
            n_sk = min(sk_queries[metric], len(q))
            sk_pred, sk_s = sklearn_predict(metric, k, train, ytrain, q[:n_sk])
            scaled = sk_s * len(q) / n_sk
            agree = int((sk_pred == ours[:n_sk]).sum())
            note = "" if n_sk == len(q) else (f" (measured on the first {n_sk} queries: {sk_s:.1f} s, "
                                              f"scaled x{len(q) / n_sk:g})")
            row |= {"sklearn_seconds": scaled, "sklearn_measured_queries": n_sk, "sklearn_measured_seconds": sk_s,
                    "speedup": scaled / seconds, "agree": agree, "compared": n_sk}
            print(f"    scikit-learn: {scaled:.1f} s{note}; imclass is {scaled / seconds:.1f}x faster; "
                  f"predictions agree on {agree}/{n_sk}")
        out[metric] = row
    return out


def validation_part(x, y, ks, metrics, n_query: int, split: int) -> dict:
    q, yq, train, ytrain = x[split:split + n_query], y[split:split + n_query], x[:split], y[:split]
    print(f"\n== choosing k on a validation split: train 0-{split - 1}, validate {split}-{split + len(q) - 1} ==")
    out = {}
    for metric in metrics:
        model = KNN(max(ks), metric=metric).fit(train, ytrain)
        scores, seconds = timed(lambda: model.score_each_k(q, yq, ks))
        acc = dict(zip(sorted(set(ks)), scores))
        best = max(ks, key=lambda k: (acc[k], -k))
        line = ", ".join(f"k={k}: {a:.2%}" for k, a in acc.items())
        print(f"{metric}: best k={best}; {max(ks)}-NN search of {len(q)} queries {seconds:.1f} s; {line}")
        out[metric] = {"accuracy_by_k": acc, "best_k": best, "seconds": seconds}
    return out


def backends_part(x, y, metrics, n_query: int, split: int) -> dict:
    from imclass import _knn_kernels

    q, train, ytrain = x[split:split + n_query], x[:split], y[:split]
    print(f"\n== imclass backends: {len(q)} queries vs {split} training images, 1-NN ==")
    backends = ["torch"] + (["numba"] if _knn_kernels.available() else [])
    try:
        import faiss  # noqa: F401

        backends.append("faiss")
    except ImportError:
        pass
    out = {}
    for metric in metrics:
        row, preds = {}, {}
        for backend in backends:
            model = KNN(1, metric=metric, backend=backend).fit(train, ytrain)
            model.predict(q[:8])  # compile / build the index outside the timing
            preds[backend], seconds = timed(lambda: model.predict(q).numpy())
            row[backend] = {"seconds": seconds, "pairs_per_second": len(q) * split / seconds,
                            "agrees_with_torch": int((preds[backend] == preds["torch"]).sum())}
        print(f"{metric}: " + ", ".join(f"{b} {r['seconds']:.1f} s ({r['pairs_per_second'] * x.shape[1] / 1e9:.1f} "
                                         f"G byte pairs/s, agrees {r['agrees_with_torch']}/{len(q)})"
                                         for b, r in row.items()))
        out[metric] = row
    return out


def cv_part(x, y, ks, metrics, folds: int) -> dict:
    print(f"\n== choosing k: {folds}-fold cross-validation on {len(x)} training images ==")
    out = {}
    for metric in metrics:
        sel, seconds = timed(lambda: choose_k(x, y, ks, metric=metric, folds=folds,
                                              plot=Path(__file__).parent / f"knn_cv_{metric}.png"))
        line = ", ".join(f"k={k}: {m:.2%}±{s:.2%}" for k, m, s in zip(sel.ks, sel.mean, sel.std))
        print(f"{metric}: best k={sel.best_k} ({seconds:.0f} s); {line}")
        out[metric] = sel.to_dict() | {"seconds": seconds}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("IMCLASS_DATA", "/work/shared/data")))
    ap.add_argument("--metrics", default="l1,l2")
    ap.add_argument("--ks", default="1,3,5,7,10,20", help="k values for the accuracy sweep and the CV")
    ap.add_argument("--speed-k", type=int, default=1, help="k of the timed run")
    ap.add_argument("--queries", type=int, default=10000, help="queries of the timed run (at most 10000)")
    ap.add_argument("--sk-l1-queries", type=int, default=500, help="queries scikit-learn's L1 is timed on")
    ap.add_argument("--sk-l2-queries", type=int, default=10000, help="queries scikit-learn's L2 is timed on")
    ap.add_argument("--sk-l1-test", type=int, default=200, help="test images scikit-learn's L1 1-NN runs on")
    ap.add_argument("--backend-queries", type=int, default=250, help="queries of the backend comparison (0: skip)")
    ap.add_argument("--folds", type=int, default=0, help="also run k-fold cross-validation on all training images")
    ap.add_argument("--parts", default="accuracy,speed,validation,backends", help="which parts to run")
    ap.add_argument("--no-sklearn", action="store_true", help="time imclass only")
    ap.add_argument("--quick", action="store_true", help="small sizes: 5,000 training images, 1,000 queries")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    x, y, xt, yt = load_cifar(args.data)
    metrics, ks = args.metrics.split(","), [int(k) for k in args.ks.split(",")]
    split = 40000
    if args.quick:  # the same run on a slice: 5,000 training images, 1,000 queries, 200 test images
        x, y, xt, yt, split = x[:6000], y[:6000], xt[:200], yt[:200], 5000
        args.queries, args.sk_l1_queries, args.sk_l2_queries, args.sk_l1_test = 1000, 100, 1000, 100
        args.folds, args.backend_queries = min(args.folds, 3), min(args.backend_queries, 100)
    env = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "load_avg_before": os.getloadavg()}
    import sklearn

    env["sklearn"] = sklearn.__version__
    print(f"imclass k-NN bench: torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
          f"{os.cpu_count()} CPUs, load average before {env['load_avg_before'][0]:.2f}")
    sk = not args.no_sklearn
    results = {"env": env}
    parts = args.parts.split(",")
    if "accuracy" in parts:
        results["accuracy"] = accuracy_part(x, y, xt, yt, ks, metrics, sk, {"l1": args.sk_l1_test, "l2": len(xt)})
    if "speed" in parts:
        results["speed"] = speed_part(x, y, args.speed_k, metrics, args.queries,
                                      {"l1": args.sk_l1_queries, "l2": args.sk_l2_queries}, sk, split)
    if "validation" in parts:
        results["validation"] = validation_part(x, y, ks, metrics, args.queries, split)
    if args.backend_queries and "backends" in parts:
        results["backends"] = backends_part(x, y, metrics, args.backend_queries, split)
    if args.folds:
        results["cv"] = cv_part(x, y, ks, metrics, args.folds)
    env["load_avg_after"] = os.getloadavg()
    print(f"\nload average after: {env['load_avg_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
