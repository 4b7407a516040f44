"""imclass vs Keras 3 (torch backend) on the course's Keras CNN for CIFAR-10, side by side.

The model (the Keras CIFAR-10 example the course uses):
    Conv2D 32 same, Conv2D 32 valid, MaxPool, Dropout .25,
    Conv2D 64 same, Conv2D 64 valid, MaxPool, Dropout .25,
    Flatten, Dense 256 relu, Dropout .5, Dense 10 softmax
trained with batch 32, Adam lr 1e-3, images scaled to [0, 1], no augmentation.

Two modes:
    python bench/keras_cnn.py                  # timed steps: --warmup steps, then --steps timed steps each
    python bench/keras_cnn.py --epochs 10      # full epochs on all 50,000 images: seconds/epoch + test accuracy

In the timed-steps mode seconds/epoch is extrapolated from the timed steps (1,563 steps of 32 make an
epoch) and the test accuracies are those after warm-up + timed steps only: they check that both
learn at the same rate, not the final accuracy (use --epochs for that). Test accuracy is on the
1,000 official CIFAR-10 test images of the shared data.

Needs keras (`pip install 'keras>=3.3,<4'`, in the `bench` extra). KERAS_BACKEND is set to torch.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import torch

BATCH = 32
LR = 1e-3


def load_cifar(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 as the Keras example holds it: uint8 (N, 32, 32, 3) and int labels."""
    with np.load(root / "cifar10" / "cifar10.npz", allow_pickle=False) as z:
        return z["x_train"], z["y_train"].astype(np.int64), z["x_test"], z["y_test"].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Keras


def keras_model():
    import keras
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(0.25),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(LR), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run_keras(x, y, xt, yt, *, warmup: int, steps: int, epochs: int, seed: int) -> dict:
    import keras

    keras.utils.set_random_seed(seed)
    model = keras_model()
    xf, xtf = x.astype("float32") / 255.0, xt.astype("float32") / 255.0
    if epochs:
        start = time.perf_counter()
        model.fit(xf, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True)
        seconds = time.perf_counter() - start
        per_epoch = seconds / epochs
    else:
        model.fit(xf[: warmup * BATCH], y[: warmup * BATCH], batch_size=BATCH, epochs=1, verbose=0)
        part = slice(warmup * BATCH, (warmup + steps) * BATCH)
        start = time.perf_counter()
        model.fit(xf[part], y[part], batch_size=BATCH, epochs=1, verbose=0)
        seconds = time.perf_counter() - start
        per_epoch = seconds / steps * math.ceil(len(x) / BATCH)
    _, accuracy = model.evaluate(xtf, yt, batch_size=500, verbose=0)
    return {"seconds": seconds, "seconds_per_epoch": per_epoch, "accuracy": float(accuracy)}


# --------------------------------------------------------------------------------------------
# imclass


def imclass_model():
    """The same network from imclass's layers (Keras-style API, final softmax kept as logits + softmax)."""
    from imclass.layers import Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential

    return Sequential(
        [
            Conv2D(32, 3, padding="same", activation="relu"),
            Conv2D(32, 3, activation="relu"),
            MaxPooling2D(),
            Dropout(0.25),
            Conv2D(64, 3, padding="same", activation="relu"),
            Conv2D(64, 3, activation="relu"),
            MaxPooling2D(),
            Dropout(0.25),
            Flatten(),
            Dense(256, activation="relu"),
            Dropout(0.5),
            Dense(10, activation="softmax"),
        ],
        input_shape=(32, 32, 3),
    )


def run_imclass(x, y, xt, yt, *, warmup: int, steps: int, epochs: int, seed: int, profile: bool) -> dict:
    from imclass.train import Classifier

    torch.manual_seed(seed)
    clf = Classifier(imclass_model(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device="cpu")
    clf.compile("adam", lr=LR)
    if epochs:
        start = time.perf_counter()
        clf.fit((x, y), epochs=epochs, batch_size=BATCH, seed=seed, verbose=False)
        seconds = time.perf_counter() - start
        per_epoch = seconds / epochs
    else:
        clf.fit((x[: warmup * BATCH], y[: warmup * BATCH]), epochs=1, batch_size=BATCH, seed=seed, verbose=False)
        part = slice(warmup * BATCH, (warmup + steps) * BATCH)
        start = time.perf_counter()
        clf.fit((x[part], y[part]), epochs=1, batch_size=BATCH, seed=seed, verbose=False)
        seconds = time.perf_counter() - start
        per_epoch = seconds / steps * math.ceil(len(x) / BATCH)
    accuracy = clf.evaluate((xt, yt))["accuracy"]
    result = {"seconds": seconds, "seconds_per_epoch": per_epoch, "accuracy": float(accuracy)}
    if profile:
        result["profile"] = profile_imclass(clf, x, y)
    return result


def profile_imclass(clf, x, y, steps: int = 50) -> str:
    """The torch profiler's table of the ops an imclass training run of ``steps`` steps spends its time in."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        clf.fit((x[: steps * BATCH], y[: steps * BATCH]), epochs=1, batch_size=BATCH, verbose=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def profile_keras(x, y, steps: int = 50) -> str:
    from torch.profiler import ProfilerActivity, profile

    model = keras_model()
    xf = x[: steps * BATCH].astype("float32") / 255.0
    model.fit(xf[: 5 * BATCH], y[: 5 * BATCH], batch_size=BATCH, verbose=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.fit(xf, y[: steps * BATCH], batch_size=BATCH, epochs=1, verbose=0)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IMCLASS_DATA", "../shared/data")))
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (timed-steps mode)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps (timed-steps mode)")
    parser.add_argument("--epochs", type=int, default=0, help="full epochs instead of timed steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["imclass", "keras"], help="run one side only")
    parser.add_argument("--profile", action="store_true", help="print the torch profiler table of both (50 steps)")
    args = parser.parse_args()
    if os.environ["KERAS_BACKEND"] != "torch":
        raise SystemExit(f"expected KERAS_BACKEND=torch, received {os.environ['KERAS_BACKEND']!r}")

    torch.set_num_threads(args.threads)
    x, y, xt, yt = load_cifar(args.data)
    if args.epochs:
        mode = f"{args.epochs} full epoch(s) on all {len(x)} training images"
    else:
        mode = (
            f"timed steps: {args.warmup} warm-up + {args.steps} timed steps of {BATCH}; "
            f"seconds/epoch extrapolated to {math.ceil(len(x) / BATCH)} steps; "
            f"accuracy after {args.warmup + args.steps} steps only (use --epochs N for a full-accuracy run)"
        )
    print(f"Keras CNN on CIFAR-10, batch {BATCH}, Adam {LR}, torch {torch.__version__}, {args.threads} threads")
    print(f"mode: {mode}")
    print(f"test accuracy on the {len(xt)} official test images of the shared data")

    kw = dict(warmup=args.warmup, steps=args.steps, epochs=args.epochs, seed=args.seed)
    results = {}
    if args.only != "keras":
        results["imclass"] = run_imclass(x, y, xt, yt, profile=args.profile, **kw)
    if args.only != "imclass":
        import keras

        results[f"keras {keras.__version__} (torch)"] = run_keras(x, y, xt, yt, **kw)
    for name, r in results.items():
        print(f"{name:>24}: {r['seconds_per_epoch']:7.1f} s/epoch  ({r['seconds']:.1f} s timed)  test accuracy {r['accuracy']:.4f}")
    if len(results) == 2:
        (a, b) = results.values()
        print(f"{'speed ratio':>24}: imclass is {b['seconds_per_epoch'] / a['seconds_per_epoch']:.2f}x Keras's speed")
    if args.profile:
        print("\nimclass, 50 steps, by self CPU time:\n" + results["imclass"]["profile"])
        print("\nKeras, 50 steps, by self CPU time:\n" + profile_keras(x, y))


if __name__ == "__main__":
    main()
