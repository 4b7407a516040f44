"""k-NN against scikit-learn's brute-force KNeighborsClassifier (the trusted oracle) on real CIFAR-10 pixels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

import imclass
from imclass.knn import KNN, NearestNeighbor, _knn_int8, _knn_kernels, _select, choose_k, neighbour_grid

# one thread: on a busy 2-core machine two spinning OpenMP/numba threads cost far more than they gain
pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import require_kernel  # noqa: E402

# every exact kernel for each metric, always generated: a kernel the CPU should run but cannot fails the case
# (require_kernel); only a CPU without the instruction (AVX2, VNNI) skips it
BACKENDS = ["torch", "numba"]
L2_BACKENDS = BACKENDS + ["int8", "pruned"]  # pruned: pooled lower bounds, exact distances (numba)
KERNELS = [("l1", b) for b in BACKENDS] + [("l2", b) for b in L2_BACKENDS]


@pytest.fixture(autouse=True)
def _kernel_expected(request):
    """Every case naming a kernel (parameter ``backend``) first checks that it can run here."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if backend in ("numba", "int8", "pruned"):
        require_kernel("numba" if backend == "pruned" else backend)
SK_METRIC = {"l1": "manhattan", "l2": "euclidean", "cosine": "cosine"}


@pytest.fixture(scope="module")
def small(cifar_small):
    """500 training and 80 query images (uint8 N, C, H, W) plus flat numpy copies for scikit-learn."""
    x, y, xt, yt = cifar_small
    x, y, xt, yt = x[:500], y[:500], xt[:80], yt[:80]
    return x, y, xt, yt, x.reshape(len(x), -1).double().numpy(), xt.reshape(len(xt), -1).double().numpy()


def _sk(metric, k, weights, X, y):
    """scikit-learn's brute k-NN fitted on float64 pixels (query it with float64 too).

    With float input scikit-learn uses its ArgKmin heap, which keeps the lower training index among
    neighbours tied at the k-th place (imclass's rule); with uint8 arrays it falls back to
    ``np.argpartition``, whose choice among such ties is arbitrary.
    """
    est = KNeighborsClassifier(k, algorithm="brute", metric=SK_METRIC[metric], weights=weights)
    return est.fit(np.asarray(X, dtype=np.float64), y)


def _oracle_l_p(Q, X, metric):
    """Exact float64 distances (M, N) from numpy: the definition, no tricks."""
    diff = Q[:, None, :] - X[None, :, :]  # float64 holding small integers: exact
    if metric == "l1":
        return np.abs(diff).sum(-1).astype(np.float64)
    return np.sqrt((diff**2).sum(-1).astype(np.float64))


_SK_ANSWERS: dict = {}  # scikit-learn's (predict, predict_proba), computed once for every backend


@pytest.mark.parametrize("metric, backend", KERNELS)
def test_predictions_equal_sklearn_brute(small, metric, backend):
    x, y, xt, _, X, Q = small
    for weights in ("uniform", "distance"):
        for k in (1, 3, 5, 10):
            key = (metric, weights, k)
            if key not in _SK_ANSWERS:
                sk = _sk(metric, k, weights, X, y.numpy())
                _SK_ANSWERS[key] = sk.predict(Q).tolist(), sk.predict_proba(Q)
            sk_pred, sk_proba = _SK_ANSWERS[key]
            model = KNN(k, metric=metric, weights=weights, backend=backend).fit(x, y)
            assert model.predict(xt).tolist() == sk_pred, key
            np.testing.assert_allclose(model.predict_proba(xt).numpy(), sk_proba, rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric, backend", KERNELS)
def test_kneighbors_are_exact_with_ties_broken_by_index(small, metric, backend):
    x, y, xt, _, X, Q = small
    # append copies of training images at later indices: exact distance ties the rule must break by index
    dup = torch.tensor([5, 17, 300, 499])
    x2, y2 = torch.cat([x, x[dup]]), torch.cat([y, (y[dup] + 1) % 10])
    queries = torch.cat([xt[:30], x[dup]])  # the copies' originals are at distance 0 twice
    X2, Q2 = x2.reshape(len(x2), -1).double().numpy(), queries.reshape(len(queries), -1).double().numpy()
    dist, idx = KNN(7, metric=metric, backend=backend).fit(x2, y2).kneighbors(queries)
    full = _oracle_l_p(Q2, X2, metric)
    order = np.lexsort((np.broadcast_to(np.arange(len(X2)), full.shape), full), axis=1)[:, :7]
    assert idx.numpy().tolist() == order.tolist()
    np.testing.assert_array_equal(dist.numpy(), np.take_along_axis(full, order, 1))
    assert idx[-4:, :2].tolist() == [[5, 500], [17, 501], [300, 502], [499, 503]]
    one = KNN(1, metric=metric, backend=backend).fit(x2, y2)  # 1-NN takes its own path: same rule
    assert one.kneighbors(x[dup])[1].squeeze(1).tolist() == dup.tolist()
    assert torch.equal(one.predict(x[dup]), y[dup])  # the copies carry other labels
    # scikit-learn returns the same neighbour sets (its final sort does not keep index order inside a tie)
    _, sk_idx = _sk(metric, 7, "uniform", X2, y2.numpy()).kneighbors(Q2)
    assert [sorted(r) for r in sk_idx.tolist()] == [sorted(r) for r in idx.tolist()]


@pytest.mark.parametrize("metric, backend", KERNELS)
def test_every_kernel_returns_sklearns_neighbours_and_distances(small, metric, backend):
    x, y, xt, _, X, Q = small
    dist, idx = KNN(10, metric=metric, backend=backend).fit(x, y).kneighbors(xt)
    if ("kneighbors", metric) not in _SK_ANSWERS:
        _SK_ANSWERS["kneighbors", metric] = _sk(metric, 10, "uniform", X, y.numpy()).kneighbors(Q)
    sk_dist, sk_idx = _SK_ANSWERS["kneighbors", metric]
    assert idx.tolist() == sk_idx.tolist()  # no ties among these real images' 10 nearest
    np.testing.assert_allclose(dist.numpy(), sk_dist, rtol=1e-13, atol=0)
    np.testing.assert_array_equal(dist.numpy(), np.take_along_axis(_oracle_l_p(Q, X, metric), sk_idx, 1))


def test_tied_votes_go_to_the_smallest_label_like_sklearn():
    # two neighbours at different distances, one vote each for labels 7 and 2: the smaller label wins
    x = torch.tensor([[0, 0], [0, 3], [9, 9]], dtype=torch.uint8)
    y = torch.tensor([7, 2, 4])
    q = torch.tensor([[0, 1]], dtype=torch.uint8)
    for metric in ("l1", "l2"):
        sk = _sk(metric, 2, "uniform", x.numpy(), y.numpy())
        assert KNN(2, metric=metric).fit(x, y).predict(q).tolist() == sk.predict(q.double().numpy()).tolist() == [2]
    proba = KNN(2).fit(x, y).predict_proba(q)
    assert proba.tolist() == [[0.5, 0.0, 0.5]]  # columns follow classes_
    assert KNN(2).fit(x, y).classes_.tolist() == [2, 4, 7]


def test_distance_weights_with_an_exact_match_give_it_the_whole_vote():
    x = torch.tensor([[0, 0], [1, 1], [1, 0], [0, 1]], dtype=torch.uint8)
    y = torch.tensor([3, 1, 1, 1])
    model = KNN(4, weights="distance").fit(x, y)
    assert model.predict(torch.tensor([[0, 0]], dtype=torch.uint8)).tolist() == [3]
    assert model.predict_proba(torch.tensor([[0, 0]], dtype=torch.uint8)).tolist() == [[0.0, 1.0]]


def test_cosine_matches_sklearn(small):
    x, y, xt, _, X, Q = small
    for k, weights in ((1, "uniform"), (5, "distance")):
        sk = _sk("cosine", k, weights, X, y.numpy())
        model = KNN(k, metric="cosine", weights=weights).fit(x, y)
        assert model.predict(xt).tolist() == sk.predict(Q).tolist()
        dist, idx = model.kneighbors(xt)
        sk_dist, sk_idx = sk.kneighbors(Q)
        np.testing.assert_allclose(dist.numpy(), sk_dist, atol=1e-12)
        assert idx.tolist() == sk_idx.tolist()


def test_numpy_channels_last_tensor_and_float64_inputs_agree(small, cifar_npz):
    x, y, xt, _, _, _ = small
    ref = KNN(3, metric="l1").fit(x, y).predict(xt)
    hwc = KNN(3, metric="l1").fit(cifar_npz["x_train"][:500], cifar_npz["y_train"][:500]).predict(
        cifar_npz["x_test"][:80])
    floats = KNN(3, metric="l1").fit(x.double(), y.numpy()).predict(xt.double())
    assert torch.equal(ref, hwc) and torch.equal(ref, floats)
    # float32 images in [0, 1] keep the ranking of the pixel distances (no exact ties among these queries)
    scaled = KNN(3, metric="l2").fit(x.float() / 255, y).predict(xt.float() / 255)
    assert torch.equal(scaled, KNN(3, metric="l2").fit(x, y).predict(xt))


def test_feature_vectors_and_score(small):
    x, y, xt, yt, X, Q = small
    model = KNN(5).fit(X.astype(np.float32), y)
    sk = _sk("l2", 5, "uniform", X.astype(np.float32), y.numpy())
    assert model.predict(Q.astype(np.float32)).tolist() == sk.predict(Q.astype(np.float32)).tolist()
    assert model.score(Q.astype(np.float32), yt) == pytest.approx(sk.score(Q.astype(np.float32), yt.numpy()))


def test_small_batches_give_the_same_answer(small):
    x, y, xt, _, _, _ = small
    whole = KNN(4, metric="l1").fit(x, y).kneighbors(xt)
    chunked = KNN(4, metric="l1", batch_size=7).fit(x, y).kneighbors(xt)
    assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[0], chunked[0])


def test_nearest_neighbor_alias():
    assert NearestNeighbor is KNN and imclass.NearestNeighbor is KNN
    assert NearestNeighbor(metric="l1").k == 1


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: KNN(k=0), r"expected k to be a positive integer, received k=0"),
        (lambda: KNN(metric="l3"), r"expected metric to be one of 'l1', 'l2', 'cosine', received 'l3'"),
        (lambda: KNN(weights="inverse"), r"expected weights to be one of 'uniform', 'distance', received 'inverse'"),
        (lambda: KNN(backend="gpu"), r"expected backend to be one of .*received 'gpu'"),
        (lambda: KNN(batch_size=0), r"expected batch_size to be a positive integer or None, received 0"),
    ],
)
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_data_raise_clear_errors(small):
    x, y, xt, _, _, _ = small
    with pytest.raises(RuntimeError, match=r"not fitted yet: call fit\(images, labels\) first"):
        KNN().predict(xt)
    model = KNN(3).fit(x[:10], y[:10])
    with pytest.raises(ValueError, match=r"expected k <= the number of training samples \(10\), received k=11"):
        model.kneighbors(xt, k=11)
    with pytest.raises(ValueError, match=r"expected k <= the number of training samples \(10\), received k=20"):
        KNN(20).fit(x[:10], y[:10]).predict(xt)
    with pytest.raises(ValueError, match=r"expected at least one sample in images, received 0"):
        model.predict(xt[:0])
    with pytest.raises(ValueError, match=r"expected at least one sample in images, received 0"):
        KNN().fit(x[:0], y[:0])
    with pytest.raises(ValueError, match=r"expected samples with 3072 values each .*received 784"):
        model.predict(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected 10 labels \(one per image\), received 9"):
        KNN().fit(x[:10], y[:9])
    with pytest.raises(ValueError, match=r"expected images of shape"):
        KNN().fit(torch.zeros(2, 3, 4, 5, 6), y[:2])
    with pytest.raises(TypeError, match=r"expected images as a torch.Tensor or numpy array, received list"):
        KNN().fit([[1, 2]], [0])


def test_numba_backend_refuses_floats(small):
    require_kernel("numba")
    x, y, xt, _, _, _ = small
    with pytest.raises(ValueError, match=r"backend='numba' computes exact integer distances"):
        KNN(backend="numba").fit(x.float(), y).predict(xt.float())


def test_state_round_trip(small):
    x, y, xt, _, _, _ = small
    model = KNN(5, metric="l1", weights="distance").fit(x[:300], y[:300] + 10)
    tensors, config = model.get_state()
    assert set(tensors) == {"train_images", "train_labels", "classes"} and config["kind"] == "knn"
    assert json.loads(json.dumps(config)) == config
    again = KNN.from_state(tensors, config)
    assert (again.k, again.metric, again.weights) == (5, "l1", "distance")
    assert torch.equal(again.classes_, model.classes_)
    assert torch.equal(again.predict_proba(xt), model.predict_proba(xt))
    with pytest.raises(ValueError, match=r"expected tensors 'train_images' and 'train_labels'"):
        KNN.from_state({"train_images": tensors["train_images"]}, config)


def test_choose_k_reuses_one_search_and_matches_separate_models(small, tmp_path):
    x, y, _, _, _, _ = small
    ks = [1, 3, 5, 10]
    sel = choose_k(x, y, ks, metric="l1", val_fraction=0.25, seed=3, plot=tmp_path / "val.png")
    # the documented split: the first quarter of torch.randperm(n) with the seed is held out
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    held, rest = perm[:125], perm[125:]
    direct = [KNN(k, metric="l1").fit(x[rest], y[rest]).score(x[held], y[held]) for k in ks]
    assert sel.mean == pytest.approx(direct, abs=0) and sel.std == [0.0] * 4
    assert sel.method == "validation" and sel.best_k == ks[int(np.argmax(direct))]
    assert all(0.12 < a < 0.45 for a in sel.mean)  # raw pixels on CIFAR-10: well above chance, far from good
    with Image.open(tmp_path / "val.png") as img:
        assert img.size[0] > 300 and img.size[1] > 200


def test_score_each_k_equals_separate_models(small):
    x, y, xt, yt, _, _ = small
    model = KNN(10, metric="l2", weights="distance").fit(x, y)
    ks = [1, 3, 5, 10]
    direct = [KNN(k, metric="l2", weights="distance").fit(x, y).score(xt, yt) for k in ks]
    assert model.score_each_k(xt, yt, [10, 3, 1, 5, 3]) == pytest.approx(direct, abs=0)  # sorted, deduplicated
    with pytest.raises(ValueError, match=r"expected every k <= the model's k \(10\), received k=20"):
        model.score_each_k(xt, yt, [1, 20])


def test_choose_k_cross_validation(small, tmp_path):
    x, y, _, _, _, _ = small
    sel = choose_k(x, y, [1, 5], folds=4, plot=tmp_path / "cv.png")
    assert sel.method == "cross-validation" and len(sel.scores) == 4 and all(len(s) == 2 for s in sel.scores)
    assert sel.mean == pytest.approx(np.mean(sel.scores, axis=0).tolist())
    assert sel.std == pytest.approx(np.std(sel.scores, axis=0).tolist())
    assert all(s > 0 for s in sel.std) and (tmp_path / "cv.png").stat().st_size > 5000
    with pytest.raises(ValueError, match=r"expected either folds or val_fraction, received both"):
        choose_k(x, y, [1], folds=3, val_fraction=0.2)
    with pytest.raises(ValueError, match=r"expected a non-empty list of positive k values"):
        choose_k(x, y, [0, 1])
    with pytest.raises(ValueError, match=r"expected 0 < val_fraction < 1, received 1.5"):
        choose_k(x, y, [1], val_fraction=1.5)


def test_neighbour_grid_png(small, tmp_path):
    x, y, xt, _, _, _ = small
    model = KNN().fit(x, y)
    path = neighbour_grid(model, xt[:4], tmp_path / "nn.png", n_neighbours=5, row_labels=list("abcd"))
    with Image.open(path) as img:
        assert img.size[1] >= 4 * 64  # 4 rows of 32-pixel images drawn at scale 2
    # the first neighbour drawn next to a query is its nearest training image
    _, idx = model.kneighbors(xt[:1], k=1)
    assert idx.shape == (1, 1)


def test_cli_json_matches_the_library(data_root):
    from typer.testing import CliRunner

    from imclass.cli import app

    runner = CliRunner()
    args = ["knn", "--data", str(data_root), "--train-limit", "600", "--test-limit", "50", "--metric", "l1",
            "--k", "3", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    train = imclass.data.load("cifar10", "train", root=data_root, limit=600)
    test = imclass.data.load("cifar10", "test", root=data_root, limit=50)
    expected = KNN(3, metric="l1").fit(train.images, train.labels).score(test.images, test.labels)
    assert out["accuracy"] == expected and out["seconds"] >= 0 and (out["k"], out["n_train"]) == (3, 600)


def test_cli_cv_and_errors(data_root, tmp_path):
    from typer.testing import CliRunner

    from imclass.cli import app

    runner = CliRunner()
    base = ["knn", "--data", str(data_root), "--train-limit", "300", "--test-limit", "20"]
    result = runner.invoke(app, base + ["--cv", "--ks", "1,3", "--folds", "3", "--plot", str(tmp_path / "k.png"),
                                        "--neighbours-png", str(tmp_path / "nn.png"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["cv"]["ks"] == [1, 3] and out["k"] == out["cv"]["best_k"]
    assert (tmp_path / "k.png").exists() and (tmp_path / "nn.png").exists()
    for extra, message in (
        (["--metric", "l7"], "expected metric to be one of"),
        (["--k", "500"], "expected --k <= the number of training images (300), received 500"),
        (["--cv", "--ks", "1,x"], "expected --ks as positive integers"),
        (["--plot", "p.png"], "--plot draws the accuracy-vs-k curve of --cv"),
        (["--dataset", "no-such-set"], "unknown data set"),
    ):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)


@pytest.mark.parametrize("m, n, d", [(5, 7, 33), (4, 2, 32), (9, 3, 784), (1, 1, 1), (3, 5, 3072)])
def test_integer_kernels_match_numpy_including_padding_and_extremes(m, n, d):
    require_kernel("numba")
    rng = np.random.default_rng(d)
    q = rng.integers(0, 256, (m, d), dtype=np.uint8)
    t = rng.integers(0, 256, (n, d), dtype=np.uint8)
    q[0], t[0] = 255, 0  # the largest possible distances and dot products must not overflow
    diff = q[:, None, :].astype(np.int64) - t[None, :, :].astype(np.int64)
    np.testing.assert_array_equal(_knn_kernels.l1_distances(q, t), np.abs(diff).sum(-1))
    sq = (q.astype(np.int64) ** 2).sum(1, keepdims=True)
    np.testing.assert_array_equal(_knn_kernels.l2_ranking(q, t) + sq, (diff**2).sum(-1))
    with pytest.raises(ValueError, match=r"expected at most 33025 values per row"):
        _knn_kernels.l2_ranking(np.zeros((1, 40000), np.uint8), np.zeros((1, 40000), np.uint8))


@pytest.mark.parametrize("m, n, d", [(5, 7, 33), (1, 1, 1), (3, 5, 3072),
                                     (2, 3, _knn_int8.INT32_RANKING_MAX_FEATURES + 1),  # int64 ranking
                                     (2, 3, _knn_int8.INT32_DOT_MAX_FEATURES + 7)])  # dot products in two pieces
def test_int8_kernel_is_exact_at_the_extremes(m, n, d):
    require_kernel("int8")
    rng = np.random.default_rng(d)
    q = rng.integers(0, 256, (m, d), dtype=np.uint8)
    t = rng.integers(0, 256, (n, d), dtype=np.uint8)
    q[0], t[0] = 0, 0  # shifted to -128 . -128: the largest dot product
    if n > 1:
        t[1] = 255  # 0 against 255: the largest distance
    diff = q[:, None, :].astype(np.int64) - t[None, :, :].astype(np.int64)
    qs, ts = _knn_int8.shift(torch.from_numpy(q)), _knn_int8.shift(torch.from_numpy(t))
    assert qs.dtype == torch.int8 and qs.to(torch.int64).tolist() == (q.astype(np.int64) - 128).tolist()
    ranking = _knn_int8.l2_ranking(qs, ts, _knn_int8.squared_norms(ts))
    assert ranking.dtype == (torch.int32 if d <= _knn_int8.INT32_RANKING_MAX_FEATURES else torch.int64)
    got = ranking.to(torch.int64) + _knn_int8.squared_norms(qs).unsqueeze(1)
    np.testing.assert_array_equal(got.numpy(), (diff**2).sum(-1))


def test_auto_takes_the_kernel_measured_fastest_for_the_shape_and_remembers_it(small, tmp_path, monkeypatch):
    from imclass.knn import estimator

    x, y, xt, _, _, _ = small
    monkeypatch.setenv("IMCLASS_CACHE", str(tmp_path))
    _select.forget()
    assert (_select.TRAIN_BLOCK, _select.MAX_BLOCK) == (4 * estimator._TRAIN_CHUNK, estimator._MAX_BLOCK)
    candidates = _select._candidates(3072)
    for name in candidates:
        require_kernel(name) if name != "torch" else None
    assert candidates == [k for k in ("int8", "numba") if k in _select.available_l2_kernels(3072)] or ["torch"]
    measured = []

    def fake(d, queries, train, kernels):  # the last candidate "wins" for small blocks, the first for big ones
        measured.append((queries, train))
        order = kernels if queries * train > 64 * 1024 else list(reversed(kernels))
        return {name: 1.0 + i for i, name in enumerate(order)}

    monkeypatch.setattr(_select, "measure_l2_kernels", fake)
    try:
        model = KNN(3, metric="l2").fit(x, y)  # 500 training rows
        model.predict(xt[:5])
        assert model.backend_ == candidates[-1] and measured == [(16, 1024)]
        record = json.loads((tmp_path / _select.RECORD_FILE).read_text())
        key = _select.record_key(3072, (16, 1024))
        assert key.endswith("|D 3072|block 16x1024") and record.get(key, {}).get("kernel") == candidates[-1], list(record)
        # a second search of the same shape class measures nothing (in this process or a later one)
        model.predict(xt[5:9])
        _select.forget()
        model.predict(xt[9:12])
        assert measured == [(16, 1024)]
        # another shape class is measured once, on a block of its own size
        model.predict(xt[:80])
        assert measured[-1] == (256, 1024) and model.backend_ == candidates[0]
        assert _select.shape_class(10_000, 50_000) == (512, 16384) and _select.block_shape(10_000, 50_000) == (512, 16384)
        assert _select.shape_class(100, 1_000) == (256, 1024)
        # a record naming a kernel that cannot run here is not trusted
        record = json.loads((tmp_path / _select.RECORD_FILE).read_text())
        record[key] = {"kernel": "quantum"}
        (tmp_path / _select.RECORD_FILE).write_text(json.dumps(record))
        _select.forget()
        assert _select.fastest_l2_kernel(3072, 5, 500) == candidates[-1] and len(measured) == 3
        # the real micro-benchmark times every candidate, nearest-neighbour selection included
        monkeypatch.undo()
        seconds = _select.measure_l2_kernels(3072, queries=8, train=64, rounds=1)
        assert list(seconds) == candidates and all(0 < s < 10 for s in seconds.values())
    finally:
        _select.forget()


def test_int8_backend_refuses_what_it_cannot_compute_exactly(small):
    x, y, xt, _, _, _ = small
    with pytest.raises(ValueError, match=r"backend='int8' computes exact squared L2 distances of uint8 pixels: "
                                         r"expected metric 'l2' and uint8 images, received metric 'l1' and uint8"):
        KNN(backend="int8", metric="l1").fit(x, y).predict(xt)
    with pytest.raises(ValueError, match=r"received metric 'l2' and float data"):
        KNN(backend="int8").fit(x.float(), y).predict(xt.float())


def test_faiss_backend_agrees_on_real_images(small):
    import faiss  # noqa: F401  (a dev dependency: CI fails at session start without it)

    x, y, xt, _, _, _ = small
    for metric in ("l1", "l2", "cosine"):
        ref = KNN(3, metric=metric).fit(x, y)
        fast = KNN(3, metric=metric, backend="faiss").fit(x, y)
        assert torch.equal(fast.predict(xt), ref.predict(xt)) and fast.backend_ == "faiss"
        # float32 arithmetic: close, not exact
        np.testing.assert_allclose(fast.kneighbors(xt)[0].numpy(), ref.kneighbors(xt)[0].numpy(), rtol=1e-4, atol=1e-6)


def test_verbose_shows_progress_over_the_queries(small, capsys):
    x, y, xt, _, _, _ = small
    KNN(2, metric="l1", batch_size=20, verbose=True).fit(x, y).predict(xt)
    err = capsys.readouterr().err  # not a terminal: a start and an end line (a bar on a terminal)
    assert "2-NN l1: 80 queries ..." in err and "2-NN l1: 80 queries in " in err and "\r" not in err


def test_searches_keep_the_callers_torch_thread_count(small):
    """numba's OpenMP layer resets the process's thread count when it starts: the caller's setting survives."""
    x, y, xt, _, _, _ = small
    assert torch.get_num_threads() == 1  # this module's `one_thread`
    for metric, backend in KERNELS:
        if backend != "torch":
            require_kernel(backend)
        KNN(2, metric=metric, backend=backend).fit(x, y).predict(xt[:4])
        assert torch.get_num_threads() == 1, (metric, backend)


def test_torch_blocks_on_wide_rows_take_fewer_rows_at_a_time_and_find_the_same_neighbours(monkeypatch):
    """A chunk's float64 copy is bounded in bytes, not rows (4,096 rows of a 224 px image were 4.9 GB)."""
    from imclass.knn import _knn_torch

    assert _knn_torch.chunk_rows(3 * 32 * 32) == _knn_torch.TRAIN_CHUNK  # CIFAR-10 rows: unchanged
    assert _knn_torch.chunk_rows(3 * 224 * 224) == 111  # 111 x 150,528 x 8 bytes < 128 MB
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=g)
    q = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    whole = KNN(5, metric="l2", backend="torch").fit(x, torch.arange(300) % 3).kneighbors(q)
    monkeypatch.setattr(_knn_torch, "CHUNK_BYTES", 8 * 192 * 7)  # 7 rows of 192 values per chunk
    assert _knn_torch.chunk_rows(192) == 7
    chunked = KNN(5, metric="l2", backend="torch").fit(x, torch.arange(300) % 3).kneighbors(q)
    assert torch.equal(chunked[1], whole[1]) and torch.equal(chunked[0], whole[0])
    exact = ((q.flatten(1).double()[:, None] - x.flatten(1).double()[None]) ** 2).sum(-1)
    assert torch.equal(whole[1], torch.sort(exact, dim=1, stable=True).indices[:, :5])
