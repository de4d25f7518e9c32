"""k-NN and linear-probe evaluation on arrays: against scikit-learn and a direct numpy reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from tests.support.tolerances import KNN_SCORE_RTOL, LINEAR_PROBE_ACCURACY_ATOL
from vitreg_jax.errors import UserError
from vitreg_jax.evaluation.knn import knn_classify
from vitreg_jax.evaluation.labelled_embeddings import LabelledEmbeddings
from vitreg_jax.evaluation.probe import holdout_split, linear_probe, standardise
from vitreg_jax.evaluation.report import evaluate_embeddings

NUM_CLASSES = 7
DIM = 32


def clusters(n: int, seed: int, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes (accuracy well between chance and 100%), float32, in a fixed layout."""
    means = np.random.default_rng(123).normal(size=(NUM_CLASSES, DIM)) * spread
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    return (means[y] + rng.normal(size=(n, DIM))).astype(np.float32), y


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xt, yt = clusters(700, 1)
    xv, yv = clusters(300, 2)
    return xt, yt, xv, yv


def reference_knn(xt, yt, xv, k, temperature):
    """DINO's formula, directly, in float64: cosine top-k (lower row first on ties), votes exp(s / T), each
    query's scaled by exp(-s_max / T) (its nearest similarity), which keeps small T finite."""
    a = xt.astype(np.float64) / np.linalg.norm(xt.astype(np.float64), axis=1, keepdims=True)
    b = xv.astype(np.float64) / np.linalg.norm(xv.astype(np.float64), axis=1, keepdims=True)
    sims = b @ a.T  # (Q, N)
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(xv), NUM_CLASSES))
    for q in range(len(xv)):
        for r in rows[q]:
            weight = 1.0 if temperature is None else np.exp((sims[q, r] - sims[q, rows[q, 0]]) / temperature)
            scores[q, yt[r]] += weight
    return scores, np.argsort(-scores, axis=1, kind="stable")[:, :5]


def test_nearest_neighbour_equals_scikit_learn(data):
    xt, yt, xv, yv = data
    ours = knn_classify(xt, yt, xv, k=1, temperature=None, num_classes=NUM_CLASSES)
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(xt, yt)
    np.testing.assert_array_equal(ours.predictions[:, 0], sk.predict(xv))
    np.testing.assert_array_equal(ours.neighbours[:, 0], sk.kneighbors(xv, return_distance=False)[:, 0])
    assert ours.accuracy(yv) == pytest.approx(sk.score(xv, yv), abs=0)
    assert 1 / NUM_CLASSES < ours.accuracy(yv) < 1  # a set where the comparison means something


@pytest.mark.parametrize(("k", "temperature"), [(20, 0.07), (5, 0.5), (9, None)])
def test_weighted_knn_equals_numpy_reference(data, k, temperature):
    xt, yt, xv, yv = data
    scores, predictions = reference_knn(xt, yt, xv, k, temperature)
    ours = knn_classify(xt, yt, xv, k=k, temperature=temperature, num_classes=NUM_CLASSES)
    np.testing.assert_allclose(ours.scores, scores, rtol=KNN_SCORE_RTOL)
    np.testing.assert_array_equal(ours.predictions, predictions)
    top1 = (predictions[:, 0] == yv).mean()
    top5 = (predictions == yv[:, None]).any(axis=1).mean()
    assert (ours.accuracy(yv, 1), ours.accuracy(yv, 5)) == (top1, top5)


def test_a_tiny_temperature_neither_overflows_nor_changes_the_ranking(data):
    """exp(s / 0.001) is inf for s near 1: every class with a near neighbour tied at inf. Scaled by the
    nearest similarity the weights stay finite and the ranking is the stable formula's."""
    xt, yt, xv, _ = data
    _, predictions = reference_knn(xt, yt, xv, 20, 0.001)
    ours = knn_classify(xt, yt, xv, k=20, temperature=0.001, num_classes=NUM_CLASSES)
    assert np.isfinite(ours.scores).all() and ours.scores.max() >= 1.0
    np.testing.assert_array_equal(ours.predictions, predictions)


def test_knn_blockwise_matches_whole(data):
    """Uneven streamed blocks and a small device block give the same neighbours as one array."""
    xt, yt, xv, _ = data
    whole = knn_classify(xt, yt, xv, k=20, num_classes=NUM_CLASSES)
    cuts = [0, 3, 250, 251, 600, len(xt)]
    blocks = (xt[a:b] for a, b in itertools.pairwise(cuts))
    streamed = knn_classify(blocks, yt, xv, k=20, num_classes=NUM_CLASSES, block_rows=64)
    np.testing.assert_array_equal(streamed.neighbours, whole.neighbours)
    np.testing.assert_array_equal(streamed.predictions, whole.predictions)


def test_knn_ties():
    """Equal similarities: the lower training row is nearer; equal class scores: the lower class id first."""
    xt = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    yt = np.array([2, 1, 0, 3])
    xv = np.array([[1, 0], [1, 1]], np.float32)
    nearest = knn_classify(xt, yt, xv, k=1, temperature=None, num_classes=4)
    assert nearest.predictions[:, 0].tolist() == [2, 2]  # row 0 (class 2) before its twin row 1 (class 1)
    votes = knn_classify(xt, yt, xv, k=2, temperature=None, num_classes=4)
    assert votes.predictions[0, :2].tolist() == [1, 2]  # classes 1 and 2 score 1 each: class 1 first
    assert votes.predictions[1, :4].tolist() == [1, 2, 0, 3]  # all four rows tie: rows 0, 1; then order


def test_linear_probe_matches_scikit_learn(data):
    xt, yt, xv, yv = data
    probe = linear_probe(xt, yt, xv, yv, seed=0, num_classes=NUM_CLASSES)
    assert probe.l2 in probe.holdout and len(probe.holdout) > 1
    a, b = standardise(xt, xv)
    sk = LogisticRegression(C=1.0 / (len(xt) * probe.l2), max_iter=10_000, tol=1e-8).fit(a, yt)
    assert abs(probe.top1 - sk.score(b, yv)) <= LINEAR_PROBE_ACCURACY_ATOL
    sk_top5 = np.argsort(-sk.decision_function(b), axis=1)[:, :5]
    assert abs(probe.top5 - (sk_top5 == yv[:, None]).any(axis=1).mean()) <= LINEAR_PROBE_ACCURACY_ATOL
    assert 1 / NUM_CLASSES < probe.top1 < 1


def test_linear_probe_is_deterministic_and_seeded(data):
    xt, yt, xv, yv = data
    first = linear_probe(xt, yt, xv, yv, seed=3, l2_grid=(1e-3, 1e-1))
    again = linear_probe(xt, yt, xv, yv, seed=3, l2_grid=(1e-3, 1e-1))
    np.testing.assert_array_equal(first.predictions, again.predictions)
    assert first.holdout == again.holdout
    fit, held = holdout_split(yt, 0.2, seed=3)
    other_fit, _ = holdout_split(yt, 0.2, seed=4)
    assert not set(fit) & set(held) and len(fit) + len(held) == len(yt)
    assert set(np.unique(yt[held])) == set(range(NUM_CLASSES))  # every class is represented
    assert not np.array_equal(fit, other_fit)


def _labelled(x, y, prefix):
    names = [f"class{int(c)}" for c in y]
    return LabelledEmbeddings(x, names, [f"{prefix}/{n}/{i:04d}.png" for i, n in enumerate(names)])


def test_evaluate_embeddings_report_and_row_order(data):
    xt, yt, xv, yv = data
    train, val = _labelled(xt, yt, "t"), _labelled(xv, yv, "v")
    report = evaluate_embeddings(train, val, seed=0, l2_grid=(1e-3, 1e-2))
    for key in ("knn_top1", "knn_top5", "knn1_top1", "linear_top1", "linear_top5"):
        assert 0.0 <= report[key] <= 1.0
    ref = knn_classify(xt, yt, xv, k=20, num_classes=NUM_CLASSES)
    assert report["knn_top1"] == ref.accuracy(yv, 1) and report["knn_top5"] == ref.accuracy(yv, 5)
    # the same rows in another order give the same numbers (evaluation sorts by class and key)
    perm = np.random.default_rng(0).permutation(len(xt))
    shuffled = LabelledEmbeddings(xt[perm], [train.names[i] for i in perm], [train.keys[i] for i in perm])
    assert evaluate_embeddings(shuffled, val, seed=0, l2_grid=(1e-3, 1e-2)) == report


def test_evaluate_embeddings_errors(data):
    xt, yt, xv, yv = data
    train, val = _labelled(xt, yt, "t"), _labelled(xv, yv, "v")
    renamed = LabelledEmbeddings(xv, ["other" if n == "class3" else n for n in val.names], val.keys)
    with pytest.raises(UserError, match=r"only in train: class3; only in val: other"):
        evaluate_embeddings(train, renamed)
    one = LabelledEmbeddings(xt[:5], ["a"] * 5, [f"a/{i}" for i in range(5)])
    with pytest.raises(UserError, match="only one class"):
        evaluate_embeddings(one, one)
    with pytest.raises(UserError, match="-k 800 is more than the 700"):
        evaluate_embeddings(train, val, k=800)
