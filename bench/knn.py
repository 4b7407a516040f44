"""k-NN on the full CIFAR-10 test set: imclass against scikit-learn's brute-force KNeighborsClassifier.

Parts, on the same data for both libraries (all 10,000 official test images as queries, all 50,000
training images as the memory, unless said otherwise):

1. accuracy: L1 and L2, every k of ``--ks`` from one imclass search for the largest k; printed beside the
   published anchors (CS231n notes: 1-NN on raw pixels 38.6 % L1, 35.4 % L2).
2. speed: 1-NN, imclass against scikit-learn on the same queries; the predictions are compared. The
   kernel imclass ran is printed (``backend_``: numba, int8 or torch), and the ratio. scikit-learn's L1
   is far too slow for all 10,000 queries: it runs on the first ``--sk-l1-queries`` of them and its time
   is scaled up linearly (said in the output).
3. kernels: every exact L2 kernel (int8 = oneDNN int8 GEMM, numba = vpmaddwd, torch = float64 GEMM) and
   L1 kernel timed on the first ``--kernel-queries`` test images, with their agreement, plus the choice
   ``backend="auto"`` makes on this host and why.
4. ``--folds 5``: choosing k by 5-fold cross-validation on all 50,000 training images (the course's
   recipe; 5 full searches per metric), then the test accuracy of the chosen k.

scikit-learn gets its fastest input: float64 for L2 (its ArgKmin GEMM path), uint8 for L1 (float input
is about twice as slow there). Run it alone when you can: every part uses every core.

    python bench/knn.py --folds 5 --json /tmp/knn.json   # everything (about 10 minutes on 2 busy cores)
    python bench/knn.py --parts speed --metrics l2       # only the L2 speed against scikit-learn
    python bench/knn.py --quick                          # a slice of the data, to check the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import cpu_info, cpu_line  # noqa: E402

from imclass.knn import KNN, _knn_kernels, _select, choose_k  # noqa: E402

SK_METRIC = {"l1": "manhattan", "l2": "euclidean"}
SK_DTYPE = {"l1": np.uint8, "l2": np.float64}
ANCHOR_1NN = {"l1": 0.386, "l2": 0.354}  # CS231n notes, raw pixels, full test set


def load_cifar(root: Path):
    import imclass

    train = imclass.data.load("cifar10", "train", root=root, download=False)  # SHA-256 checked (once)
    test = imclass.data.load("cifar10", "test", root=root, download=False)
    # flat rows; the feature order does not change L1/L2 distances
    flat = lambda ds: ds.images.reshape(len(ds), -1).numpy()  # noqa: E731
    return flat(train), train.labels.numpy(), flat(test), test.labels.numpy()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sklearn_predict(metric: str, k: int, x, y, q):
    dt = SK_DTYPE[metric]
    model = KNeighborsClassifier(k, algorithm="brute", metric=SK_METRIC[metric]).fit(x.astype(dt), y)
    return timed(lambda: model.predict(q.astype(dt)))


def accuracy_part(x, y, xt, yt, ks, metrics) -> dict:
    print(f"\n== accuracy: {len(xt):,} test images vs {len(x):,} training images (raw pixels) ==")
    out = {}
    for metric in metrics:
        model = KNN(max(ks), metric=metric).fit(x, y)
        scores, seconds = timed(lambda: model.score_each_k(xt, yt, ks))
        acc = dict(zip(sorted(set(ks)), scores))
        row = {"imclass_seconds": seconds, "accuracy_by_k": acc, "backend": model.backend_,
               "anchor_1nn_cs231n": ANCHOR_1NN[metric], "test_images": len(xt)}
        line = ", ".join(f"k={k}: {a:.2%}" for k, a in acc.items())
        print(f"{metric}: 1-NN {acc.get(1, float('nan')):.2%} (CS231n notes: {ANCHOR_1NN[metric]:.1%}); {line}; "
              f"{seconds:.1f} s for the {max(ks)} nearest of each ({model.backend_})")
        out[metric] = row
    return out


def speed_part(x, y, xt, yt, k: int, metrics, sk_queries: dict, sk: bool) -> dict:
    print(f"\n== speed: {k}-NN of {len(xt):,} test images vs {len(x):,} training images ==")
    out = {}
    for metric in metrics:
        model = KNN(k, metric=metric).fit(x, y)
        model.predict(xt[:8])  # compile / warm up / choose the kernel outside the timing
        ours, seconds = timed(lambda: model.predict(xt).numpy())
        row = {"imclass_seconds": seconds, "backend": model.backend_, "queries": len(xt),
               "imclass_accuracy": float((ours == yt).mean())}
        print(f"{metric}: imclass {seconds:.1f} s (kernel: {model.backend_}), accuracy {row['imclass_accuracy']:.2%}")
        if sk:
            n_sk = min(sk_queries[metric], len(xt))
            sk_pred, sk_s = sklearn_predict(metric, k, x, y, xt[:n_sk])
            scaled = sk_s * len(xt) / n_sk
            agree = int((sk_pred == ours[:n_sk]).sum())
            note = "" if n_sk == len(xt) else (f" (measured on the first {n_sk} queries: {sk_s:.1f} s, "
                                               f"scaled x{len(xt) / n_sk:g})")
            row |= {"sklearn_seconds": scaled, "sklearn_measured_queries": n_sk, "sklearn_measured_seconds": sk_s,
                    "speedup": scaled / seconds, "agree": agree, "compared": n_sk,
                    "sklearn_accuracy_measured_queries": float((sk_pred == yt[:n_sk]).mean())}
            print(f"    scikit-learn brute: {scaled:.1f} s{note}; imclass/{model.backend_} is "
                  f"{scaled / seconds:.1f}x faster; predictions identical on {agree}/{n_sk}")
        out[metric] = row
    return out


def kernels_part(x, y, xt, metrics, n_query: int) -> dict:
    q = xt[:n_query]
    print(f"\n== imclass kernels: 1-NN of {len(q)} test images vs {len(x):,} training images ==")
    choice = _select.l2_choice(x.shape[1])
    print(f"backend='auto' takes for L2 on this host: {choice['kernel']} ({choice['reason']}"
          + (", " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in choice["seconds"].items()) if choice["seconds"]
             else "") + ")")
    bench = _select.measure_l2_kernels(x.shape[1])  # what auto would time on a CPU without VNNI
    print("micro-benchmark of the exact L2 kernels (128 x 2,048 rows, best of 5): "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in bench.items()))
    out = {"auto_l2": choice, "l2_micro_benchmark_seconds": bench}
    kernels = {"l1": ["torch"] + (["numba"] if _knn_kernels.available() else []),
               "l2": list(reversed(_select.available_l2_kernels(x.shape[1])))}
    for metric in metrics:
        row, preds = {}, {}
        for backend in kernels[metric]:
            model = KNN(1, metric=metric, backend=backend).fit(x, y)
            model.predict(q[:8])  # compile / warm up outside the timing
            (d, i), seconds = timed(lambda: model.kneighbors(q))
            preds[backend] = (d.numpy(), i.numpy())
            ref_d, ref_i = preds[kernels[metric][0]]
            row[backend] = {"seconds": seconds, "pairs_per_second": len(q) * len(x) / seconds,
                            "identical_to_torch": bool((preds[backend][1] == ref_i).all()
                                                       and (preds[backend][0] == ref_d).all())}
        print(f"{metric}: " + ", ".join(f"{b} {r['seconds']:.2f} s ({r['pairs_per_second'] * x.shape[1] / 1e9:.3g} G "
                                         f"byte pairs/s{'' if r['identical_to_torch'] else ', DIFFERS from torch'})"
                                         for b, r in row.items()))
        out[metric] = row
    return out


def cv_part(x, y, xt, yt, ks, metrics, folds: int) -> dict:
    print(f"\n== choosing k: {folds}-fold cross-validation on the {len(x):,} training images ==")
    out = {}
    for metric in metrics:
        sel, seconds = timed(lambda: choose_k(x, y, ks, metric=metric, folds=folds,
                                              plot=Path("/tmp") / f"knn_cv_{metric}.png"))
        line = ", ".join(f"k={k}: {m:.2%}±{s:.2%}" for k, m, s in zip(sel.ks, sel.mean, sel.std))
        test_acc, test_s = timed(lambda: KNN(sel.best_k, metric=metric).fit(x, y).score(xt, yt))
        print(f"{metric}: best k={sel.best_k} ({seconds:.0f} s); {line}")
        print(f"    test accuracy of k={sel.best_k}: {test_acc:.2%} on the {len(xt):,} test images ({test_s:.1f} s)")
        out[metric] = sel.to_dict() | {"seconds": seconds, "test_accuracy": test_acc}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("IMCLASS_DATA", "/work/shared/data")))
    ap.add_argument("--metrics", default="l1,l2")
    ap.add_argument("--ks", default="1,3,5,7,10,20", help="k values for the accuracy sweep and the CV")
    ap.add_argument("--speed-k", type=int, default=1, help="k of the timed run")
    ap.add_argument("--sk-l1-queries", type=int, default=500, help="queries scikit-learn's L1 is timed on")
    ap.add_argument("--sk-l2-queries", type=int, default=10000, help="queries scikit-learn's L2 is timed on")
    ap.add_argument("--kernel-queries", type=int, default=250, help="queries of the kernel comparison (0: skip)")
    ap.add_argument("--folds", type=int, default=0, help="also choose k by k-fold cross-validation (5: the course)")
    ap.add_argument("--parts", default="accuracy,speed,kernels", help="which parts to run (and cv with --folds)")
    ap.add_argument("--no-sklearn", action="store_true", help="time imclass only")
    ap.add_argument("--quick", action="store_true", help="small sizes: 5,000 training images, 500 test images")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    x, y, xt, yt = load_cifar(args.data)
    metrics, ks = args.metrics.split(","), [int(k) for k in args.ks.split(",")]
    if args.quick:
        x, y, xt, yt = x[:5000], y[:5000], xt[:500], yt[:500]
        args.sk_l1_queries, args.sk_l2_queries = 50, 500
        args.folds, args.kernel_queries = min(args.folds, 3), min(args.kernel_queries, 100)
    import sklearn

    env = {"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "sklearn": sklearn.__version__, "load_avg_before": os.getloadavg()}
    print(cpu_line())
    print(f"imclass k-NN bench: torch {torch.__version__} ({env['threads']} threads), scikit-learn "
          f"{sklearn.__version__}, load average before {env['load_avg_before'][0]:.2f}")
    sk = not args.no_sklearn
    results = {"env": env}
    parts = args.parts.split(",")
    if "accuracy" in parts:
        results["accuracy"] = accuracy_part(x, y, xt, yt, ks, metrics)
    if "speed" in parts:
        results["speed"] = speed_part(x, y, xt, yt, args.speed_k, metrics,
                                      {"l1": args.sk_l1_queries, "l2": args.sk_l2_queries}, sk)
    if args.kernel_queries and "kernels" in parts:
        results["kernels"] = kernels_part(x, y, xt, metrics, args.kernel_queries)
    if args.folds:
        results["cv"] = cv_part(x, y, xt, yt, ks, metrics, args.folds)
    env["load_avg_after"] = os.getloadavg()
    print(f"\nload average after: {env['load_avg_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
