"""Pooled least squares from sufficient statistics, with ridge chosen by cross-validation.

OLSS (Duan et al., CIKM'23, eq. 9-10) fits one scalar coefficient per basis vector, shared by
every sample and element: min_c Σ_s ||y_s − Σ_j c_j b_{s,j}||². Everything such a fit needs is
the Gram matrix of the vectors involved, accumulated over samples in float64, so the data never
has to be held at once. The samples are dealt into folds (sample s -> fold s mod K) and a Gram
is kept per fold: held-out error of a coefficient vector c on fold f is

    (y'y − 2 c'B'y + c'B'B c) / count_f,  all read from G_f,

which makes choosing the ridge λ by K-fold cross-validation a handful of tiny solves.

The plain normal equations are badly conditioned (model outputs at nearby times are nearly
parallel: condition numbers of 1e8 are usual), so they are solved in the standardised basis
(unit-norm columns) and the ridge is relative to it: the penalty is λ·Σ_j (B'B)_jj·c_j².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RIDGE_GRID = (0.0,) + tuple(10.0**e for e in range(-12, 0))
SINGULAR_RCOND = 1e-13  # smallest eigenvalue of the basis' correlation matrix below this: singular


class CalibrationError(ValueError):
    """Calibration input that cannot give a meaningful fit (named in the message)."""


@dataclass
class Fit:
    coef: np.ndarray  # one coefficient per basis vector
    ridge: float  # the relative λ used
    mse: float  # mean squared error per element over all samples (in-sample)
    cv_mse: float | None  # K-fold held-out error of the chosen λ (None without folds)
    rel_residual: float  # sqrt(sum of squared errors / sum of squared targets)
    condition: float  # condition number of the basis' correlation matrix


class GramAccumulator:
    """Per-fold Gram matrices of a fixed list of named vectors per sample (float64)."""

    def __init__(self, names: list[str], folds: int):
        if folds < 1:
            raise ValueError("folds must be >= 1")
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.folds = folds
        self.gram = np.zeros((folds, len(names), len(names)))
        self.count = np.zeros(folds)  # elements (samples x latent size) per fold
        self.samples = np.zeros(folds, dtype=np.int64)

    def add(self, vectors: torch.Tensor | np.ndarray, sample_ids) -> None:
        """vectors: [S, V, ...] with V = len(names); sample_ids: the S global sample indices."""
        v = torch.as_tensor(vectors).to(torch.float64)
        if v.dim() < 2 or v.shape[1] != len(self.names):
            raise ValueError(f"expected vectors of shape [samples, {len(self.names)}, ...], got {tuple(v.shape)}")
        v = v.reshape(v.shape[0], v.shape[1], -1)
        if not bool(torch.isfinite(v).all()):
            bad = [self.names[j] for j in range(v.shape[1]) if not bool(torch.isfinite(v[:, j]).all())]
            raise CalibrationError(f"non-finite values (NaN/inf) in {', '.join(bad)}")
        folds = np.asarray(sample_ids) % self.folds
        for f in np.unique(folds):
            part = v[torch.as_tensor(folds == f)]
            g = torch.einsum("sid,sjd->ij", part, part)
            self.gram[f] += g.numpy()
            self.count[f] += part.shape[0] * part.shape[2]
            self.samples[f] += part.shape[0]

    @property
    def total(self) -> np.ndarray:
        return self.gram.sum(axis=0)

    def fit(self, basis: list[str], target: str, ridge: float | str = "auto") -> Fit:
        idx = [self.index[b] for b in basis] + [self.index[target]]
        sub = self.gram[:, idx][:, :, idx]  # only the vectors involved (the full Gram may be large)
        return fit_from_gram(sub, self.count, list(range(len(basis))), len(basis), ridge, basis)


def _solve_all(g_bb: np.ndarray, g_by: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """Ridge solutions for every λ at once: c(λ) = argmin ||y − Bc||² + λ Σ_j G_jj c_j², solved
    in the standardised basis (columns scaled to unit norm, so the eigenvalues are those of the
    correlation matrix and the penalty treats every basis vector alike)."""
    d = np.sqrt(np.diag(g_bb))
    d = np.where(d > 0, d, 1.0)
    w, v = np.linalg.eigh(g_bb / np.outer(d, d))
    proj = v.T @ (g_by / d)
    denom = w[None, :] + lambdas[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(np.abs(denom) > 0, proj[None, :] / denom, 0.0) @ v.T
    return coef / d[None, :]  # [len(lambdas), p]


def _sse(gram: np.ndarray, b: list[int], y: int, coef: np.ndarray) -> np.ndarray:
    """Sum of squared errors of coefficient rows `coef` [L, p] on the data behind `gram`."""
    g_bb = gram[np.ix_(b, b)]
    g_by = gram[b, y]
    return gram[y, y] - 2 * coef @ g_by + np.einsum("lp,pq,lq->l", coef, g_bb, coef)


def basis_condition(g_bb: np.ndarray, names: list[str]) -> float:
    """Condition number of the basis' correlation matrix (inf when singular); CalibrationError if
    a basis vector is zero on every sample."""
    diag = np.diag(g_bb)
    for name, d in zip(names, diag):
        if not d > 0:
            raise CalibrationError(f"basis vector {name} is zero on every calibration sample: the basis is singular")
    corr = g_bb / np.sqrt(np.outer(diag, diag))
    w = np.linalg.eigvalsh(corr)
    return float(w[-1] / w[0]) if w[0] > 0 else float("inf")


def fit_from_gram(
    gram: np.ndarray,
    count: np.ndarray,
    basis: list[int],
    target: int,
    ridge: float | str = "auto",
    names: list[str] | None = None,
) -> Fit:
    """Fit target on basis from per-fold Gram matrices [K, V, V] and per-fold element counts.

    ridge="auto" picks λ from RIDGE_GRID by K-fold cross-validation (K >= 2 needed); a number
    fixes the relative λ (0 = plain least squares).
    """
    names = names or [f"v{i}" for i in basis]
    total = gram.sum(axis=0)
    g_bb = total[np.ix_(basis, basis)]
    condition = basis_condition(g_bb, names)
    if ridge != "auto" and float(ridge) == 0 and condition > 1 / SINGULAR_RCOND:
        raise CalibrationError(
            f"the basis {', '.join(names)} is singular (condition number {condition:.1e}), so plain least squares "
            "(ridge=0) has no unique solution: duplicated model outputs or a constant model? Use ridge='auto'"
        )
    folds = gram.shape[0]
    cv = None
    if ridge == "auto":
        lambdas = np.array(RIDGE_GRID)
        if condition > 1 / SINGULAR_RCOND:
            lambdas = lambdas[1:]  # a singular basis needs some ridge
        if folds < 2:
            raise CalibrationError("ridge='auto' needs at least 2 folds of calibration samples to choose λ")
        sse = np.zeros(lambdas.size)
        for f in range(folds):
            train = total - gram[f]
            coef = _solve_all(train[np.ix_(basis, basis)], train[basis, target], lambdas)
            sse += _sse(gram[f], basis, target, coef)
        best = int(np.argmin(np.where(np.isfinite(sse), sse, np.inf)))
        lam = float(lambdas[best])
        cv = float(sse[best] / count.sum())
    else:
        lam = float(ridge)
        if not lam >= 0:
            raise ValueError(f"ridge must be 'auto' or a number >= 0, got {ridge!r}")
    coef = _solve_all(g_bb, total[basis, target], np.array([lam]))
    sse_in = float(_sse(total, basis, target, coef)[0])
    return Fit(
        coef=coef[0],
        ridge=lam,
        mse=max(sse_in, 0.0) / float(count.sum()),
        cv_mse=cv,
        rel_residual=float(np.sqrt(max(sse_in, 0.0) / total[target, target])) if total[target, target] > 0 else 0.0,
        condition=condition,
    )
