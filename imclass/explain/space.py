"""Feature space against pixel space: the nearest training images of a test image in each, a 2-D
t-SNE map of test features, and the course's "same L2 distance" picture."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from imclass.data.arrays import as_images, as_labels
from imclass.explain._net import as_net, class_name, features, one_image
from imclass.knn import KNN
from imclass.visualize.grids import save_captioned_grid
from imclass.visualize.plots import pyplot, save_figure

# Deferred imports (inside functions), for start-up time: sklearn.manifold, sklearn.neighbors
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["neighbours", "tsne_map", "same_l2"]


def _nearest(train: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    nn_ = NearestNeighbors(n_neighbors=min(k, len(train))).fit(train)
    dist, idx = nn_.kneighbors(query)
    return dist[0], idx[0]


def neighbours(model: Any, image: Any, train_images: Any, train_labels: Any, *, k: int = 8,
               classes: Sequence[str] | None = None, out: str | Path | None = None,
               true_class: str | None = None) -> dict[str, Any]:
    """The ``k`` nearest training images of ``image`` by L2 distance in raw pixels and in the model's
    feature space (L2 on unit-length features: cosine), by scikit-learn's ``NearestNeighbors``;
    ``out`` writes the picture (query then neighbours; pixel row above feature row; the query captioned
    with its ``true_class``, when known, and the predicted class)."""
    net = as_net(model)
    train_images = as_images(train_images)
    train_labels = as_labels(train_labels, len(train_images), name="train labels")
    x = one_image(image, net)
    query = (x[0].cpu() * 255).round().to(torch.uint8)
    names = list(classes or net.classes or [str(i) for i in range(int(train_labels.max()) + 1)])
    # exact L2 over the uint8 pixels, ties by index, a bounded chunk of rows at a time (no float copy of the set)
    pixels = KNN(k=min(k, len(train_images)), metric="l2", backend="torch").fit(train_images, train_labels)
    pix_d, pix_i = (t[0].numpy() for t in pixels.kneighbors(query[None]))
    query_feats = torch.nn.functional.normalize(features(net, query[None], progress=False), dim=1).numpy()
    train_feats = torch.nn.functional.normalize(features(net, train_images), dim=1).numpy()  # no copy of the images
    feat_d, feat_i = _nearest(train_feats, query_feats, k)
    with torch.no_grad():
        predicted = int(net.probs(x).argmax(1)[0])
    result = {
        "method": "neighbours", "predicted": class_name(net, predicted) if net.classes else names[predicted],
        "pixel": [{"index": int(i), "label": names[int(train_labels[i])], "distance": float(d)} for d, i in zip(pix_d, pix_i)],
        "feature": [{"index": int(i), "label": names[int(train_labels[i])], "distance": float(d)} for d, i in zip(feat_d, feat_i)],
        "feature_space": "raw pixels (a k-NN model has no learned features)" if net.knn is not None else "the classifier head's input",
    }
    if out is not None:
        kk = len(pix_i)
        imgs = [query] + [train_images[i] for i in pix_i] + [query] + [train_images[i] for i in feat_i]
        query_caption = (f"{true_class} → " if true_class is not None else "query → ") + f"{result['predicted']}"
        caps = ([query_caption] + [f"{r['label']} {r['distance']:.0f}" for r in result["pixel"]]
                + [query_caption] + [f"{r['label']} {r['distance']:.2f}" for r in result["feature"]])
        save_captioned_grid(imgs, caps, out, cols=kk + 1,
                            title=f"query (true → predicted class), then its nearest training images: raw-pixel L2 "
                                 f"(top) vs {result['feature_space']} (bottom)")
        result["out"] = str(out)
    return result


def tsne_map(model: Any, images: Any, labels: Any, *, classes: Sequence[str] | None = None, perplexity: float = 30.0,
             max_iter: int = 1000, seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """A 2-D t-SNE (scikit-learn) of the model's features of ``images``, coloured by true class;
    ``out`` writes the scatter plot. Returns the coordinates and how often an image's nearest
    neighbour on the map has its class (a number for how well the map separates the classes)."""
    from sklearn.manifold import TSNE
    from sklearn.neighbors import KNeighborsClassifier

    net = as_net(model)
    images = as_images(images)
    labels = as_labels(labels, len(images), name="labels")
    if len(images) < 5:
        raise ValueError(f"expected at least 5 images for a t-SNE map, received {len(images)}")
    feats = features(net, images).numpy()
    xy = TSNE(n_components=2, perplexity=min(perplexity, (len(images) - 1) / 3), init="pca", max_iter=max_iter,
              random_state=seed).fit_transform(feats)
    y = labels.numpy()
    agree = KNeighborsClassifier(n_neighbors=2).fit(xy, y).kneighbors(xy, 2, return_distance=False)[:, 1]
    names = list(classes or net.classes or [str(i) for i in range(int(y.max()) + 1)])
    result = {"method": "tsne", "images": len(images), "neighbour_agreement": float((y[agree] == y).mean()),
              "coordinates": xy.tolist(), "labels": y.tolist()}
    if out is not None:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=100)
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for c in np.unique(y):
            m = y == c
            ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(int(c) % cmap.N), label=names[int(c)])
        ax.legend(fontsize=7, markerscale=2, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t-SNE of {len(y):,} images' features (nearest neighbour on the map: same class "
                     f"{result['neighbour_agreement']:.0%})", fontsize=9)
        save_figure(fig, out)
        result["out"] = str(out)
    return result


def _l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm())


def _bisect(make, target: float, lo: float, hi: float, steps: int = 40) -> torch.Tensor:
    """``make(t)`` for the t in [lo, hi] whose L2 distance from the original is ``target`` (it grows with t)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        img, dist = make(mid)
        lo, hi = (mid, hi) if dist < target else (lo, mid)
    return make(hi)[0]


def same_l2(image: Any, train_images: Any, train_labels: Any, model: Any = None, *, shift: int = 2,
            classes: Sequence[str] | None = None, k: int = 1, out: str | Path | None = None) -> dict[str, Any]:
    """The course's "same L2 distance" picture: a shifted (``shift`` pixels right and down, edges
    repeated), an occluded (a grey square, sized and blended to match) and a darkened copy of
    ``image``, each at the same raw-pixel L2 distance from it. Reports the answer of a raw-pixel
    k-NN (``k``, L2, on the training images) and of ``model`` (when given) for all four."""
    from sklearn.neighbors import KNeighborsClassifier

    x = as_images(torch.as_tensor(image)[None] if torch.as_tensor(image).ndim == 3 else image)
    if len(x) != 1:
        raise ValueError(f"expected one image (C, H, W), received {len(x)}")
    x = x[0].float()  # (C, H, W) on 0..255
    c, h, w = x.shape
    if not 1 <= shift < min(h, w):
        raise ValueError(f"expected 1 <= shift < {min(h, w)}, received {shift}")
    train_images = as_images(train_images)
    train_labels = as_labels(train_labels, len(train_images), name="train labels")
    padded = torch.nn.functional.pad(x[None], (shift, 0, shift, 0), mode="replicate")[0]
    shifted = padded[:, :h, :w]
    d = _l2(shifted, x)
    if d == 0:
        raise ValueError("the image is flat: shifting it changes nothing, so there is no distance to match")

    def occlude(alpha: float, size: int) -> tuple[torch.Tensor, float]:
        y = x.clone()
        top, left = (h - size) // 2, (w - size) // 2
        y[:, top : top + size, left : left + size] = (1 - alpha) * y[:, top : top + size, left : left + size] + alpha * 128.0
        return y, _l2(y, x)

    size = max(2, min(h, w) // 4)
    while occlude(1.0, size)[1] < d and size < min(h, w):
        size += 1
    occluded = _bisect(lambda a: occlude(a, size), d, 0.0, 1.0)

    def darken(amount: float) -> tuple[torch.Tensor, float]:
        y = (x - amount).clamp(min=0)
        return y, _l2(y, x)

    darkened = _bisect(darken, d, 0.0, 255.0) if darken(255.0)[1] >= d else darken(255.0)[0]
    copies = {"original": x, "shifted": shifted, "occluded": occluded, "darkened": darkened}
    as_u8 = {n: v.round().clamp(0, 255).to(torch.uint8) for n, v in copies.items()}
    knn = KNeighborsClassifier(n_neighbors=k).fit(train_images.flatten(1).float().numpy(), train_labels.numpy())
    batch = torch.stack(list(as_u8.values()))
    knn_pred = knn.predict(batch.flatten(1).float().numpy())
    names = list(classes or (as_net(model).classes if model is not None else []) or
                 [str(i) for i in range(int(train_labels.max()) + 1)])
    net_pred = None
    if model is not None:
        net = as_net(model)
        with torch.no_grad():
            net_pred = net.probs(batch.float().div(255).to(net.device)).argmax(1).cpu().tolist()
    rows = []
    for i, (name, img) in enumerate(as_u8.items()):
        row = {"copy": name, "l2": _l2(img, as_u8["original"]), "knn": names[int(knn_pred[i])]}
        if net_pred is not None:
            row["network"] = names[net_pred[i]]
        rows.append(row)
    result = {
        "method": "same-l2", "l2": d, "knn_k": k, "train_images": len(train_images), "copies": rows,
        "knn_changes": sum(r["knn"] != rows[0]["knn"] for r in rows[1:]),
        "network_changes": None if net_pred is None else sum(r["network"] != rows[0]["network"] for r in rows[1:]),
    }
    if out is not None:
        caps = [f"{r['copy']} L2={r['l2']:.0f}\nk-NN: {r['knn']}" + (f"\nnet: {r['network']}" if "network" in r else "")
                for r in rows]
        save_captioned_grid(list(as_u8.values()), caps, out, cols=4, tile_inches=1.8,
                            title="same pixel L2 distance from the original: raw-pixel k-NN vs the network")
        result["out"] = str(out)
    return result
