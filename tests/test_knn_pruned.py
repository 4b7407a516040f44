"""The pruned exact L2 search (imclass.knn._knn_pruned): pooled lower bounds never exceed the true distance,
and the neighbours, distances, votes and tie-breaking are those of the full search and of scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from conftest import require_kernel
from imclass.knn import KNN, _knn_pruned, _select

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _numba():
    require_kernel("numba")  # the pruned search's exact distances are a numba kernel


def _oracle_order(q: torch.Tensor, x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances and indices of the k nearest, ordered by (distance, index): numpy int64, the definition."""
    Q, X = q.reshape(len(q), -1).numpy().astype(np.int32), x.reshape(len(x), -1).numpy().astype(np.int32)
    full = np.stack([((row - X) ** 2).sum(-1, dtype=np.int64) for row in Q])  # one query at a time: bounded memory
    order = np.lexsort((np.broadcast_to(np.arange(len(X)), full.shape), full), axis=1)[:, :k]
    return np.take_along_axis(full, order, 1), order


@pytest.fixture(scope="module")
def near_ties(cifar_small):
    """CIFAR-10 training images plus near-copies (a few pixels moved by 1: distances differing by 1 or 2) and
    exact copies under other labels; queries: test images and perturbed training images."""
    x, y, xt, _ = cifar_small
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, len(x), (300,), generator=gen)
    near = x[base].clone().reshape(300, -1)
    cols = torch.randint(0, near.shape[1], (300, 3), generator=gen)
    rows = torch.arange(300).unsqueeze(1).expand(-1, 3)
    v = near[rows, cols].long()
    near[rows, cols] = torch.where(v < 255, v + 1, v - 1).to(torch.uint8)
    exact = x[base[:100]]
    x2 = torch.cat([x, near.reshape(-1, *x.shape[1:]), exact])
    y2 = torch.cat([y, (y[base] + 1) % 10, (y[base[:100]] + 2) % 10])
    q = x[base[::3]].clone().reshape(100, -1)
    q[:, ::97] = q[:, ::97] // 2  # perturbed copies: several training images nearly equidistant
    queries = torch.cat([xt[:60], q.reshape(-1, *x.shape[1:])])
    return x2, y2, queries


@pytest.mark.parametrize("pool", [2, 4])
def test_pooled_bound_never_exceeds_the_true_distance(pool):
    gen = torch.Generator().manual_seed(1)
    for shape in ((3, 32, 32), (1, 5, 7), (2, 4, 6)):
        d = int(np.prod(shape))
        rows = torch.randint(0, 256, (64, d), dtype=torch.uint8, generator=gen)
        rows[0], rows[1] = 0, 255  # extremes
        checker = (torch.arange(d) % 2 * 255).to(torch.uint8)
        rows[2], rows[3] = checker, 255 - checker  # pooling loses almost everything between these two
        rows[4] = 127
        rows[5] = 128  # block means at .5 and around it: the rounding's worst cases
        p, e = _knn_pruned.pooled(rows, shape, pool)
        assert p.shape == (64, _knn_pruned.pooled_features(shape, pool)) and p.dtype == torch.uint8
        # the block means are exact multiples of 1/pool^2: the rounding error is known exactly
        c, h, w = shape
        hb, wb = h // pool, w // pool
        blocks = rows.view(64, c, h, w)[:, :, :hb * pool, :wb * pool].reshape(64, c, hb, pool, wb, pool)
        sums = blocks.long().sum((3, 5)).reshape(64, -1)
        b2 = pool * pool
        assert torch.equal(p.long(), (2 * sums + b2) // (2 * b2))  # floor(mean + 1/2)
        np.testing.assert_allclose(e.numpy(), (((sums - b2 * p.long()) ** 2).sum(1).double().sqrt() / b2).numpy(),
                                   rtol=1e-15, atol=0)
        true = ((rows.long()[:, None] - rows.long()[None]) ** 2).sum(-1).double().sqrt()
        pooled = ((p.long()[:, None] - p.long()[None]) ** 2).sum(-1).double().sqrt()
        bound = pool * (pooled - e[:, None] - e[None]).clamp(min=0)  # the bound the search uses
        assert (bound <= true + 1e-9).all()
        exact_means = pool * ((sums[:, None] - sums[None]).double() / b2).pow(2).sum(-1).sqrt()
        assert (exact_means <= true + 1e-9).all() and exact_means[2, 3] < true[2, 3] / 10


@pytest.fixture(scope="module")
def near_ties_truth(near_ties):
    """The 10 nearest of every near-ties query by the definition (the first k of them: the k nearest)."""
    x2, _, queries = near_ties
    return _oracle_order(queries, x2, 10)


@pytest.mark.parametrize("k, coarse", [(1, 2), (3, 2), (10, 2), (3, 4)])
def test_pruned_search_equals_the_definition_on_near_ties(near_ties, near_ties_truth, k, coarse, monkeypatch):
    x2, y2, queries = near_ties
    monkeypatch.setattr(_knn_pruned, "COARSE", coarse)  # 4: the two-level cascade (4 x 4, then 2 x 2)
    model = KNN(k, backend="pruned").fit(x2, y2)
    dist, idx = model.kneighbors(queries)
    sq, order = near_ties_truth[0][:, :k], near_ties_truth[1][:, :k]
    assert idx.numpy().tolist() == order.tolist()
    np.testing.assert_array_equal(dist.numpy(), np.sqrt(sq.astype(np.float64)))
    # the exact copies (appended last) sit at the same distance as their originals: the earlier index first
    copies = KNN(2, backend="pruned").fit(x2, y2).kneighbors(x2[-100:])[1]
    first = [int(torch.nonzero((x2[:-100] == x2[j]).reshape(len(x2) - 100, -1).all(1))[0]) for j in range(len(x2) - 100, len(x2))]
    assert copies[:, 0].tolist() == first


def test_pruned_votes_equal_sklearn_and_the_full_kernels(near_ties):
    x2, y2, queries = near_ties
    X, Q = x2.reshape(len(x2), -1).double().numpy(), queries.reshape(len(queries), -1).double().numpy()
    for k in (1, 4, 7):
        for weights in ("uniform", "distance"):
            sk = KNeighborsClassifier(k, algorithm="brute", weights=weights).fit(X, y2.numpy())
            pruned = KNN(k, weights=weights, backend="pruned").fit(x2, y2)
            full = KNN(k, weights=weights, backend="torch").fit(x2, y2)
            assert pruned.predict(queries).tolist() == sk.predict(Q).tolist() == full.predict(queries).tolist()
            np.testing.assert_array_equal(pruned.predict_proba(queries).numpy(), full.predict_proba(queries).numpy())
            assert pruned.backend_ == "pruned"


def test_pruning_skips_most_distances_on_real_images(cifar_small):
    x, _, xt, _ = cifar_small
    rows = x.reshape(len(x), -1)
    kernel = _select.fastest_l2_kernel(_knn_pruned.pooled_features(tuple(x.shape[1:]), _knn_pruned.COARSE), 100, len(x))
    index = _knn_pruned.PrunedIndex.build(rows, tuple(x.shape[1:]), kernel)  # the kernel a search would take
    d, i, work = index.search(xt.reshape(len(xt), -1)[:100], 5)
    sq, order = _oracle_order(xt[:100], x, 5)
    assert i.numpy().tolist() == order.tolist() and d.numpy().tolist() == sq.tolist()
    assert work < 0.05  # under 5 % of the full search's work (fine bounds and exact distances)


def test_noise_falls_back_to_the_full_search_with_the_same_answer():
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (600, 3, 8, 8), dtype=torch.uint8, generator=gen)  # noise: pooling says little
    y = torch.randint(0, 4, (600,), generator=gen)
    q = torch.randint(0, 256, (150, 3, 8, 8), dtype=torch.uint8, generator=gen)
    index = _knn_pruned.PrunedIndex.build(x.reshape(600, -1), (3, 8, 8), "torch")
    assert index.search(q.reshape(150, -1)[:64], 3)[2] > _knn_pruned.MAX_WORK_FRACTION  # pruning does not pay
    model = KNN(3, backend="pruned", batch_size=64).fit(x, y)
    dist, idx = model.kneighbors(q)  # the first chunk pruned, the rest by the plain kernel
    sq, order = _oracle_order(q, x, 3)
    assert idx.numpy().tolist() == order.tolist()
    np.testing.assert_array_equal(dist.numpy(), np.sqrt(sq.astype(np.float64)))


def test_auto_prunes_large_image_searches_only(cifar_small):
    x, y, xt, _ = cifar_small
    assert _select.prune_pays(100, _select.PRUNE_MIN_TRAIN) and not _select.prune_pays(100, _select.PRUNE_MIN_TRAIN - 1)
    model = KNN(1).fit(x, y)  # 2,000 CIFAR-10 training images
    model.predict(xt[:20])
    assert model.backend_ == ("pruned" if _select.prune_pays(20, len(x)) else _select.fastest_l2_kernel(3072, 20, len(x)))
    flat = KNN(1).fit(x.reshape(len(x), -1), y)  # feature vectors: nothing to pool
    flat.predict(xt[:20].reshape(20, -1))
    assert flat.backend_ != "pruned"


def test_pruned_backend_refuses_what_it_cannot_search(cifar_small):
    x, y, xt, _ = cifar_small
    with pytest.raises(ValueError, match=r"backend='pruned' computes exact L2 distances of uint8 images .* "
                                         r"received metric 'l1', uint8 samples of shape \(3, 32, 32\)"):
        KNN(backend="pruned", metric="l1").fit(x[:50], y[:50]).predict(xt[:5])
    with pytest.raises(ValueError, match=r"received metric 'l2', uint8 samples of shape \(3072,\)"):
        KNN(backend="pruned").fit(x[:50].reshape(50, -1), y[:50]).predict(xt[:5].reshape(5, -1))
