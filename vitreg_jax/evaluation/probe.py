"""Linear probe: multinomial logistic regression on frozen embeddings (the MAE paper's linear evaluation).

:func:`linear_probe` standardises the embeddings with the training set's mean and standard deviation, picks
the L2 strength from a small grid by top-1 accuracy on a held-out slice of the training set (stratified: the
same fraction of every class, drawn with ``seed``), refits on the whole training set with that strength and
reports top-1 / top-5 accuracy on the validation set.

The model is ``logits = x @ W + b`` and the objective is the mean cross-entropy plus ``l2 / 2 * ||W||^2``
(the bias is not penalised), so scikit-learn's ``LogisticRegression(C=1 / (n * l2))`` minimises the same
function. It is minimised full-batch with optax's L-BFGS (zoom line search) from zeros, inside one jitted
``while_loop`` per training-set shape, until the gradient norm falls below ``tol`` or ``max_iter`` steps:
no randomness, so a given seed (which only draws the held-out slice) gives the same result every run.
Ties in the selection go to the lower held-out loss, then to the larger ``l2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax.errors import UserError

# L2 strengths tried (per-sample objective: mean cross-entropy + l2 / 2 * ||W||^2)
L2_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# share of each class's training rows held out to choose the L2 strength
HOLDOUT_FRACTION = 0.2
MAX_ITER = 500
GRAD_TOL = 1e-5
# a feature whose training standard deviation is below this is only centred (constant features)
MIN_STD = 1e-6
TOP_K = 5


@dataclass(frozen=True)
class ProbeResult:
    """Validation accuracies and what produced them.

    ``predictions`` is (Q, min(5, C)) class ids, best first (ties between equal logits: lower class id first).
    ``holdout`` maps each L2 strength tried to its held-out top-1 accuracy (empty when no slice could be held
    out, see :func:`holdout_split`).
    """

    top1: float
    top5: float
    l2: float
    predictions: np.ndarray
    holdout: dict[float, float] = field(default_factory=dict)
    iterations: int = 0


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``train`` and ``others`` centred and scaled by ``train``'s per-feature mean and standard deviation."""
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std = np.where(std < MIN_STD, 1.0, std)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit_rows, held_rows)``: ``round(fraction * n_c)`` random rows of each class c held out (at least one
    when the class has two or more rows, and never all of them). ``held_rows`` may be empty."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held.append(rows[:n])
        fit.append(rows[n:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def _loss(
    params: tuple[jax.Array, jax.Array], x: jax.Array, y: jax.Array, rows: jax.Array, l2: jax.Array
) -> jax.Array:
    w, b = params
    logits = x @ w + b  # (N, C)
    nll = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    return jnp.sum(rows * nll) / jnp.sum(rows) + 0.5 * l2 * jnp.sum(w * w)


@partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit(
    x: jax.Array,
    y: jax.Array,
    rows: jax.Array,
    l2: jax.Array,
    tol: jax.Array,
    *,
    num_classes: int,
    max_iter: int,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """L-BFGS from zeros on the rows where ``rows`` is 1: ``((W (D, C), b (C,)), iterations)``. Held-out rows
    are masked rather than cut, so that the selection fits and the final fit share one compiled function
    (L-BFGS with its line search takes XLA:CPU ~20 s to compile; each fit then takes milliseconds)."""
    with jax.default_matmul_precision("highest"):
        params = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
        fun = partial(_loss, x=x, y=y, rows=rows, l2=l2)
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(fun)

        def step(carry):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fun)
            return optax.apply_updates(p, updates), state

        def going(carry):
            _, state = carry
            count = optax.tree_utils.tree_get(state, "count")
            grad = optax.tree_utils.tree_get(state, "grad")
            return (count == 0) | ((count < max_iter) & (optax.tree.norm(grad) >= tol))

        params, state = jax.lax.while_loop(going, step, (params, opt.init(params)))
        return params, optax.tree_utils.tree_get(state, "count")


def _logits(params: tuple[jax.Array, jax.Array], x: np.ndarray) -> np.ndarray:
    w, b = (np.asarray(p, np.float64) for p in params)
    return x.astype(np.float64) @ w + b  # (Q, C)


def ranking(scores: np.ndarray, top: int = TOP_K) -> np.ndarray:
    """(Q, min(top, C)) class ids by decreasing score; equal scores: lower class id first."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, : min(top, scores.shape[1])]


def topk_accuracy(predictions: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among their first ``k`` predictions."""
    if len(labels) == 0:
        return float("nan")
    return float((predictions[:, :k] == np.asarray(labels)[:, None]).any(axis=1).mean())


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    *,
    num_classes: int,
    rows: np.ndarray | None = None,
    max_iter: int = MAX_ITER,
    tol: float = GRAD_TOL,
) -> tuple[tuple[jax.Array, jax.Array], int]:
    """One fit on already-standardised rows (only those listed in ``rows``, default all):
    ``((W, b), iterations)``."""
    mask = np.ones(len(x), np.float32)
    if rows is not None:
        mask[:] = 0.0
        mask[rows] = 1.0
    params, count = _fit(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y, jnp.int32),
        jnp.asarray(mask),
        jnp.float32(l2),
        jnp.float32(tol),
        num_classes=num_classes,
        max_iter=max_iter,
    )
    return params, int(count)


def linear_probe(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    val_emb: np.ndarray,
    val_labels: np.ndarray,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    l2_grid: tuple[float, ...] = L2_GRID,
    holdout_fraction: float = HOLDOUT_FRACTION,
    max_iter: int = MAX_ITER,
    tol: float = GRAD_TOL,
) -> ProbeResult:
    """Logistic regression on standardised frozen embeddings; top-1 / top-5 accuracy on ``val``.

    Labels are integer class ids in ``[0, num_classes)`` (default: one more than the largest label seen).
    The L2 strength is the grid value with the best held-out top-1 accuracy (a single-value grid skips the
    selection; when no row can be held out, the middle grid value is used).
    """
    train_emb, val_emb = np.asarray(train_emb, np.float32), np.asarray(val_emb, np.float32)
    train_labels, val_labels = np.asarray(train_labels, np.int64), np.asarray(val_labels, np.int64)
    if train_emb.ndim != 2 or val_emb.ndim != 2 or train_emb.shape[1] != val_emb.shape[1]:
        raise UserError(f"expected (N, D) embeddings of one width, got {train_emb.shape} and {val_emb.shape}")
    if len(train_labels) != len(train_emb) or len(val_labels) != len(val_emb):
        raise UserError("expected one label per embedding")
    if not l2_grid:
        raise UserError("l2_grid must hold at least one L2 strength")
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=0), val_labels.max(initial=0))) + 1
    x_train, x_val = standardise(train_emb, val_emb)

    holdout: dict[float, float] = {}
    fit_rows, held_rows = holdout_split(train_labels, holdout_fraction, seed)
    if len(l2_grid) == 1:
        l2 = float(l2_grid[0])
    elif len(held_rows) == 0:
        l2 = float(l2_grid[len(l2_grid) // 2])
    else:
        # standardised with the statistics of the rows it is fitted on, as val is with train's
        x_sel = standardise(train_emb[fit_rows], train_emb)[1]
        y_held = train_labels[held_rows]
        choice = []
        for value in l2_grid:
            params, _ = fit_probe(
                x_sel, train_labels, value, num_classes=num_classes, rows=fit_rows, max_iter=max_iter, tol=tol
            )
            logits = _logits(params, x_sel[held_rows])
            holdout[float(value)] = acc = topk_accuracy(ranking(logits, 1), y_held, 1)
            loss = float(np.mean(_log_softmax(logits)[np.arange(len(y_held)), y_held]) * -1)
            choice.append((acc, -loss, value))
        l2 = float(max(choice)[2])

    params, iterations = fit_probe(
        x_train, train_labels, l2, num_classes=num_classes, max_iter=max_iter, tol=tol
    )
    predictions = ranking(_logits(params, x_val))
    return ProbeResult(
        top1=topk_accuracy(predictions, val_labels, 1),
        top5=topk_accuracy(predictions, val_labels, TOP_K),
        l2=l2,
        predictions=predictions,
        holdout=holdout,
        iterations=iterations,
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
