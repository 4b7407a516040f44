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

5. ``sizes``: L2 1-NN at every problem size of ``--sizes`` (queries x training images, from 100 x 1,000 up),
   imclass against scikit-learn, to show imclass is never the slower one.

The peer runs at full strength: the script re-executes itself without ``OPENBLAS_CORETYPE`` /
``OPENBLAS_L2_SIZE`` (``bench/host.py``), and the BLAS kernel scikit-learn's numpy/scipy got is recorded
(threadpoolctl) in the output. scikit-learn gets its fastest input: float64 for L2 (its ArgKmin GEMM
path), uint8 for L1 (float input is about twice as slow there). Timings are a user's *second* call (the
first, with its one-time kernel choice, is made before), imclass and scikit-learn interleaved
(A B B A ..., ``--rounds``, at least 3), median and range; the load average is taken before and after and
the figures are refused (exit status 3) when it exceeded the cores in use (``--allow-busy`` keeps them,
marked ``"refused": true``, for a trial run). Run it alone: every part uses every core.

    python bench/knn.py --json                                      # the published run: JSON on stdout
    python bench/knn.py --parts speed,sizes --json bench/knn_speed.json   # speed + sizes into a result file
    python bench/knn.py --quick --allow-busy                        # a slice of the data, to check the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402

host.full_strength_blas()  # before numpy: the peer and imclass's numpy work run on the CPU's own BLAS kernel

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

from imclass.knn import KNN, _knn_kernels, _select, choose_k  # noqa: E402

print = __import__("functools").partial(print, file=sys.stderr, flush=True)  # noqa: A001 (stdout: the JSON)

SK_METRIC = {"l1": "manhattan", "l2": "euclidean"}
SK_DTYPE = {"l1": np.uint8, "l2": np.float64}
ANCHOR_1NN = {"l1": 0.386, "l2": 0.354}  # CS231n notes, raw pixels, full test set


def load_cifar(root: Path):
    import imclass

    train = imclass.data.load("cifar10", "train", root=root, download=False)  # SHA-256 checked (once)
    test = imclass.data.load("cifar10", "test", root=root, download=False)
    # images (N, 3, 32, 32) as a user passes them (imclass's L2 search pools them for its lower bounds);
    # scikit-learn gets the same pixels as flat rows (``flat``)
    return train.images.numpy(), train.labels.numpy(), test.images.numpy(), test.labels.numpy()


def flat(images: np.ndarray) -> np.ndarray:
    """Images (N, C, H, W) -> rows (N, C*H*W): scikit-learn's input (the order does not change L1/L2)."""
    return images.reshape(len(images), -1)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


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


def speed_part(x, y, xt, yt, k: int, metrics, sk_queries: dict, sk: bool, rounds: int) -> dict:
    print(f"\n== speed: {k}-NN of {len(xt):,} test images vs {len(x):,} training images, "
          f"{rounds} interleaved rounds (a user's second call) ==")
    out = {}
    for metric in metrics:
        model = KNN(k, metric=metric).fit(x, y)
        first, first_s = timed(lambda: model.predict(xt).numpy())  # the user's first call: kernel choice included
        sides = {"imclass": lambda: model.predict(xt).numpy()}
        n_sk = min(sk_queries[metric], len(xt))
        if sk:
            dt = SK_DTYPE[metric]
            est = KNeighborsClassifier(k, algorithm="brute", metric=SK_METRIC[metric]).fit(flat(x).astype(dt), y)
            q_sk = flat(xt[:n_sk]).astype(dt)
            sides["sklearn"] = lambda: est.predict(q_sk)
        res = host.interleave(sides, rounds=rounds)
        ours = res["imclass"]["result"]
        assert (ours == first).all(), "imclass's first and later calls disagree"
        row = {"backend": model.backend_, "queries": len(xt), "train": len(x), "first_call_seconds": first_s,
               "imclass_seconds": res["imclass"]["median"], "imclass": _timing(res["imclass"]),
               "imclass_accuracy": float((ours == yt).mean())}
        print(f"{metric}: imclass median {row['imclass_seconds']:.2f} s (range {res['imclass']['min']:.2f}-"
              f"{res['imclass']['max']:.2f}; first call {first_s:.2f} s; kernel {model.backend_}), "
              f"accuracy {row['imclass_accuracy']:.2%}")
        if sk:
            scale = len(xt) / n_sk
            sk_pred = res["sklearn"]["result"]
            agree = int((sk_pred == ours[:n_sk]).sum())
            sk_t = {key: v * scale for key, v in _timing(res["sklearn"]).items() if key != "runs"}
            row |= {"sklearn_seconds": sk_t["median"], "sklearn": _timing(res["sklearn"]) | {"scaled_x": scale},
                    "sklearn_measured_queries": n_sk, "agree": agree, "compared": n_sk,
                    "speedup": sk_t["median"] / row["imclass_seconds"],
                    "speedup_range": [sk_t["min"] / res["imclass"]["max"], sk_t["max"] / res["imclass"]["min"]],
                    "sklearn_accuracy_measured_queries": float((sk_pred == yt[:n_sk]).mean())}
            note = "" if n_sk == len(xt) else f" (measured on the first {n_sk} queries, scaled x{scale:g})"
            print(f"    scikit-learn brute: median {sk_t['median']:.2f} s{note}; imclass/{model.backend_} is "
                  f"{row['speedup']:.2f}x faster (range {row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}); "
                  f"predictions identical on {agree}/{n_sk}")
        out[metric] = row
    return out


def sizes_part(x, y, xt, sizes, rounds: int, sk: bool) -> dict:
    """L2 1-NN at each (queries, training) size: imclass's second call against scikit-learn, interleaved."""
    print(f"\n== sizes: L2 1-NN, imclass (second call) vs scikit-learn brute, {rounds} interleaved rounds ==")
    out = {}
    for m, n in sizes:
        if m > len(xt) or n > len(x):
            print(f"{m} x {n}: skipped (the data holds {len(xt)} queries x {len(x)} training images)")
            continue
        xm, ym, q = x[:n], y[:n], xt[:m]
        model = KNN(1, metric="l2").fit(xm, ym)
        first, first_s = timed(lambda: model.predict(q).numpy())
        sides = {"imclass": lambda: model.predict(q).numpy()}
        if sk:
            est = KNeighborsClassifier(1, algorithm="brute").fit(flat(xm).astype(np.float64), ym)
            qf = flat(q).astype(np.float64)
            sides["sklearn"] = lambda: est.predict(qf)
        res = host.interleave(sides, rounds=rounds)
        row = {"queries": m, "train": n, "backend": model.backend_, "first_call_seconds": first_s,
               "imclass": _timing(res["imclass"])}
        line = f"{m:>6} x {n:<6} imclass {res['imclass']['median']:.3f} s ({model.backend_}, first call {first_s:.3f} s)"
        if sk:
            row["sklearn"] = _timing(res["sklearn"])
            row["speedup"] = res["sklearn"]["median"] / res["imclass"]["median"]
            row["speedup_range"] = [res["sklearn"]["min"] / res["imclass"]["max"],
                                    res["sklearn"]["max"] / res["imclass"]["min"]]
            row["identical"] = bool((res["sklearn"]["result"] == first).all())
            line += (f", scikit-learn {res['sklearn']['median']:.3f} s: {row['speedup']:.2f}x "
                     f"(range {row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}), "
                     f"identical {row['identical']}")
        print(line)
        out[f"{m}x{n}"] = row
    return out


def _timing(t: dict) -> dict:
    return {key: t[key] for key in ("median", "min", "max", "runs")}


def kernels_part(x, y, xt, metrics, n_query: int) -> dict:
    x, xt = flat(x), flat(xt)  # rows: the plain kernels (the pruned search needs images: the speed part)
    q = xt[:n_query]
    print(f"\n== imclass kernels: 1-NN of {len(q)} test images vs {len(x):,} training images ==")
    choice = _select.l2_choice(x.shape[1], len(xt), len(x))
    print(f"backend='auto' takes for L2 on this host at {len(xt)} x {len(x)}: {choice['kernel']} ({choice['reason']}"
          + (", " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in choice["seconds"].items()) if choice["seconds"]
             else "") + ")")
    bench = _select.measure_l2_kernels(x.shape[1], kernels=_select.available_l2_kernels(x.shape[1]))
    print("micro-benchmark of every exact L2 kernel (128 x 2,048 rows, nearest selected, best of 3): "
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
    ap.add_argument("--parts", default="accuracy,speed,sizes,kernels",
                    help="which parts to run: accuracy, speed, sizes, kernels (and cv with --folds)")
    ap.add_argument("--sizes", default="100x1000,500x1000,100x10000,500x10000,2000x10000,2000x50000",
                    help="queries x training images of the sizes part")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per timing (at least 3)")
    ap.add_argument("--no-sklearn", action="store_true", help="time imclass only")
    ap.add_argument("--quick", action="store_true", help="small sizes: 5,000 training images, 500 test images")
    ap.add_argument("--allow-busy", action="store_true",
                    help="keep figures taken while the load exceeded the cores in use (marked refused)")
    ap.add_argument("--json", nargs="?", const="-", help="write the figures as JSON to this file ('-' or no "
                    "value: stdout; the progress lines go to stderr)")
    args = ap.parse_args()

    guard = host.LoadGuard(cores=torch.get_num_threads(), strict=not args.allow_busy)
    x, y, xt, yt = load_cifar(args.data)
    metrics, ks = args.metrics.split(","), [int(k) for k in args.ks.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    if args.quick:
        x, y, xt, yt = x[:5000], y[:5000], xt[:500], yt[:500]
        args.sk_l1_queries, args.sk_l2_queries = 50, 500
        args.folds, args.kernel_queries = min(args.folds, 3), min(args.kernel_queries, 100)
        sizes = [(m, n) for m, n in sizes if m <= 500 and n <= 5000] or [(100, 1000)]
    import sklearn

    print(host.cpu_line())
    print(f"imclass k-NN bench: torch {torch.__version__} ({torch.get_num_threads()} threads), scikit-learn "
          f"{sklearn.__version__} on {host.blas_kernel_line()}, load average before {guard.before[0]:.2f}")
    sk = not args.no_sklearn
    results: dict = {"peer": {"library": "scikit-learn", "version": sklearn.__version__,
                              "estimator": "KNeighborsClassifier(algorithm='brute')",
                              "blas": [b for b in host.blas_kernels() if b.get("user_api") == "blas"],
                              "full_strength_blas": not any(v in os.environ for v in host.HANDICAP_VARS)}}
    parts = args.parts.split(",")
    if "accuracy" in parts:
        results["accuracy"] = accuracy_part(x, y, xt, yt, ks, metrics)
    if "speed" in parts:
        results["speed"] = speed_part(x, y, xt, yt, args.speed_k, metrics,
                                      {"l1": args.sk_l1_queries, "l2": args.sk_l2_queries}, sk, args.rounds)
    if "sizes" in parts:
        results["sizes"] = sizes_part(x, y, xt, sizes, args.rounds, sk)
    if args.kernel_queries and "kernels" in parts:
        results["kernels"] = kernels_part(x, y, xt, metrics, args.kernel_queries)
    if args.folds:
        results["cv"] = cv_part(x, y, xt, yt, ks, metrics, args.folds)
    l2 = results.get("speed", {}).get("l2", {})
    results["summary"] = {"peer_blas_kernel": host.blas_kernel_line(results["peer"]["blas"]),
                          "l2_ratio": l2.get("speedup"), "l2_ratio_range": l2.get("speedup_range"),
                          "l2_goal": 3.0, "l1_ratio": results.get("speed", {}).get("l1", {}).get("speedup"),
                          "slowest_size_ratio": min((r["speedup"] for r in results.get("sizes", {}).values()
                                                     if "speedup" in r), default=None)}
    try:
        status = guard.check()
    except host.HostBusy as err:
        print(f"\n{err}")
        raise SystemExit(3) from None
    print(f"\nload average after: {status['load_after'][0]:.2f}" + (" (BUSY: figures refused)" if status["refused"] else ""))
    print(f"summary: peer BLAS {results['summary']['peer_blas_kernel']}; L2 ratio {results['summary']['l2_ratio']}")
    if args.json:
        path = None if args.json == "-" else Path(args.json)
        target = path or Path(os.devnull)
        record = host.write_result(target, results, guard=guard)
        if path is None:
            sys.stdout.write(json.dumps(record, indent=1, default=host.jsonable) + "\n")


if __name__ == "__main__":
    main()
