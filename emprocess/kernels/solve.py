"""One regularized least-squares solve of every slice's affine from many pair models (pure).

Slices are numbered 0..n-1 here (slice minz is 0). A pair ``(pre, post, model)`` says
that ``model`` (6 numbers, :mod:`emprocess.affine`'s mpicbg order, full-resolution
pixels) maps pixels of slice ``post`` onto pixels of slice ``pre``. Each pair becomes
four virtual point matches ``p -> q = model(p)`` at the corners of a square around the
slice centre (an affine pair model is fully described by three points; four keep the
rows symmetric), and each slice gets the global affine ``G`` that makes
``G_pre(q) = G_post(p)`` hold best for all pairs at once, in pixels.

The regularizer is TrakEM2's / render's idea of an affine that leans toward a rigid
model: every slice's linear part is pulled toward the nearest rotation (taken from the
previous iterate; the first iterate leans toward a similarity), with weight
``regularization`` times half the slice's longer side, so a deviation of the linear
part is counted as the pixels it moves the slice's edge. Only the non-rigid part is
pulled, so long stacks keep their true rotation and shift but do not slowly shear or
scale. The robust step drops pairs whose residual after the solve exceeds
``max(robust_factor * median, robust_floor_px)`` (the worst first: those above 0.75 times
the largest residual) and solves again; a slice left
without any pair is dropped too. Dropped slices, and slices ``excluded`` by the
caller, get a transform bridged (interpolated element-wise in z) from their nearest
solved neighbours. Slice 0 (or the first slice solved, when 0 is dropped) is fixed
to the identity, so results are in its frame. Where no pair crosses between two
solved neighbours the stack would fall apart into independent pieces; an identity
link joins them (today's behaviour for an unmatched pair) and the later slice is
reported in ``gaps``.

The normal equations are banded (a slice only meets its k nearest neighbours), so
scipy's sparse direct solver handles 50,000 slices x 4 neighbours in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve

DEFAULT_REGULARIZATION = 10.0
ROBUST_FACTOR = 4.0
ROBUST_FLOOR_PX = 2.0
MAX_ROUNDS = 20
"""Robust rounds at most (each a solve); rounds stop as soon as nothing more is dropped."""


@dataclass(frozen=True)
class SolveResult:
    """Outcome of :func:`solve_affines`.

    Attributes:
        transforms: (n, 6) global affines (mpicbg order) mapping slice z into slice 0's
            frame (or the first solved slice's).
        solved: (n,) whether the slice took part in the final solve (else bridged).
        pair_used: (P,) whether the pair was kept by the robust step.
        pair_residual_px: (P,) RMS distance in px between where the pair's virtual
            points land from both slices, after the solve (all pairs, used or not).
        slice_residual_px: (n,) largest residual of the slice's used pairs (0 if none).
        gaps: slices (indices) where an identity link replaced missing pairs.
        rounds: solves run.
    """

    transforms: np.ndarray
    solved: np.ndarray
    pair_used: np.ndarray
    pair_residual_px: np.ndarray
    slice_residual_px: np.ndarray
    gaps: list[int]
    rounds: int


def _virtual_points(size_xy: tuple[int, int]) -> np.ndarray:
    w, h = float(size_xy[0]), float(size_xy[1])
    cx, cy, rx, ry = (w - 1) / 2, (h - 1) / 2, w / 4, h / 4
    return np.array(
        [[cx - rx, cy - ry], [cx + rx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]]
    )


def _apply_rows(params: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply per-row affines (m, 6) to per-row point sets (m, k, 2)."""
    m00, m10, m01, m11, m02, m12 = (params[:, i, None] for i in range(6))
    x, y = pts[..., 0], pts[..., 1]
    return np.stack([m00 * x + m01 * y + m02, m10 * x + m11 * y + m12], axis=-1)


def _system(
    n: int,
    pre: np.ndarray,
    post: np.ndarray,
    p: np.ndarray,
    q: np.ndarray,
    fixed: int,
    reg_weight: float,
    target: np.ndarray | None,
    weight: np.ndarray,
) -> tuple[sp.csc_matrix, np.ndarray]:
    """Normal equations of all point rows plus regularizer rows, slice ``fixed`` eliminated.

    Unknowns per slice: m00, m01, m02, m10, m11, m12 (x row then y row).
    """
    m, k = p.shape[0], p.shape[1]
    w_rows = np.broadcast_to(weight[:, None], (m, k))
    ones = w_rows
    q = q * weight[:, None, None]
    p = p * weight[:, None, None]
    # x equation: m00_i qx + m01_i qy + m02_i - (m00_j px + m01_j py + m02_j) = 0; y alike.
    rows, cols, vals = [], [], []
    base = np.arange(m * k).reshape(m, k)
    for eq, off in ((0, 0), (1, 3)):
        r = 2 * base + eq
        for coef_pre, coef_post, c in (
            (q[..., 0], p[..., 0], 0),
            (q[..., 1], p[..., 1], 1),
            (ones, ones, 2),
        ):
            rows += [r, r]
            cols += [6 * pre[:, None] + off + c + 0 * r, 6 * post[:, None] + off + c + 0 * r]
            vals += [coef_pre, -coef_post]
    n_rows = 2 * m * k
    r_idx = np.concatenate([a.ravel() for a in rows])
    c_idx = np.concatenate([a.ravel() for a in cols])
    v = np.concatenate([a.ravel() for a in vals])
    rhs_parts = [np.zeros(n_rows)]
    # Regularizer rows, 4 per slice: the linear part toward a rigid target, or (no
    # target yet) toward a similarity: m00 - m11 = 0 and m01 + m10 = 0.
    z = np.arange(n)
    if target is None:
        rr = n_rows + 2 * z
        r_idx = np.concatenate([r_idx, rr, rr, rr + 1, rr + 1])
        c_idx = np.concatenate([c_idx, 6 * z, 6 * z + 4, 6 * z + 1, 6 * z + 3])
        w = np.full(n, reg_weight)
        v = np.concatenate([v, w, -w, w, w])
        rhs_parts.append(np.zeros(2 * n))
        n_rows += 2 * n
    else:
        rr = n_rows + 4 * z
        r_idx = np.concatenate([r_idx, rr, rr + 1, rr + 2, rr + 3])
        c_idx = np.concatenate([c_idx, 6 * z, 6 * z + 1, 6 * z + 3, 6 * z + 4])
        w = np.full(n, reg_weight)
        v = np.concatenate([v, w, w, w, w])
        # target columns: m00, m01, m10, m11 of the rotation
        rhs_parts.append((reg_weight * target).ravel())
        n_rows += 4 * n
    a = sp.csr_matrix((v, (r_idx, c_idx)), shape=(n_rows, 6 * n)).tocsc()
    rhs = np.concatenate(rhs_parts)
    keep = np.ones(6 * n, dtype=bool)
    keep[6 * fixed : 6 * fixed + 6] = False
    x_fixed = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    rhs = rhs - a[:, ~keep] @ x_fixed
    a = a[:, keep]
    at = a.T.tocsc()
    return (at @ a).tocsc(), at @ rhs


def _nearest_rotation(x: np.ndarray) -> np.ndarray:
    """(n, 4) [cos, -sin, sin, cos] nearest (in angle) to each slice's linear part."""
    theta = np.arctan2(x[:, 3] - x[:, 1], x[:, 0] + x[:, 4])
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([c, -s, s, c], axis=1)


def _solve_once(
    n: int,
    pre: np.ndarray,
    post: np.ndarray,
    p: np.ndarray,
    q: np.ndarray,
    fixed: int,
    reg_weight: float,
    previous: np.ndarray | None,
    weight: np.ndarray,
) -> np.ndarray:
    """One least-squares solve; returns (n, 6) unknowns in row order m00 m01 m02 m10 m11 m12."""
    target = None if previous is None else _nearest_rotation(previous)
    normal, rhs = _system(n, pre, post, p, q, fixed, reg_weight, target, weight)
    x = np.asarray(spsolve(normal, rhs))
    full = np.empty(6 * n)
    keep = np.ones(6 * n, dtype=bool)
    keep[6 * fixed : 6 * fixed + 6] = False
    full[keep] = x
    full[~keep] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    return full.reshape(n, 6)


def _mpicbg(x: np.ndarray) -> np.ndarray:
    """Row order (m00 m01 m02 m10 m11 m12) -> mpicbg order (m00 m10 m01 m11 m02 m12)."""
    return x[:, [0, 3, 1, 4, 2, 5]]


def _bridge(transforms: np.ndarray, solved: np.ndarray) -> np.ndarray:
    """Interpolate unsolved slices' transforms element-wise from their solved neighbours."""
    zs = np.flatnonzero(solved)
    out = transforms.copy()
    missing = np.flatnonzero(~solved)
    if len(missing) and len(zs):
        for col in range(6):
            out[missing, col] = np.interp(missing, zs, transforms[zs, col])
    return out


def _gap_links(idx: np.ndarray, pre: np.ndarray, post: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive solved slices (a, b) that no pair crosses; ``pre``/``post`` are local."""
    if len(idx) < 2:
        return []
    cover = np.zeros(len(idx) + 1, dtype=np.int64)
    np.add.at(cover, pre + 1, 1)
    np.add.at(cover, post + 1, -1)
    crossing = np.cumsum(cover)[1 : len(idx)]  # pairs spanning local boundary b-1 | b
    return [(int(b) - 1, int(b)) for b in np.flatnonzero(crossing == 0) + 1]


def solve_affines(
    n: int,
    pre: np.ndarray,
    post: np.ndarray,
    models: np.ndarray,
    size_xy: tuple[int, int],
    regularization: float = DEFAULT_REGULARIZATION,
    excluded: np.ndarray | None = None,
    robust_factor: float = ROBUST_FACTOR,
    robust_floor_px: float = ROBUST_FLOOR_PX,
    weights: np.ndarray | None = None,
) -> SolveResult:
    """Fit one affine per slice to all pair models at once (see the module docstring).

    Args:
        n: number of slices.
        pre: (P,) int slice index of each pair's first slice.
        post: (P,) int slice index of each pair's second slice (any other slice).
        models: (P, 6) pair affines post -> pre (mpicbg order, full-resolution px).
        size_xy: (width, height) of a slice in pixels.
        regularization: weight of the pull toward rigid, >= 0 (0 is a plain affine fit
            with only the similarity start).
        excluded: (n,) bool, slices to leave out of the solve and bridge.
        robust_factor: drop pairs with residual above this times the median ...
        robust_floor_px: ... and above this many pixels.
        weights: (P,) > 0, how much each pair counts (its rows are scaled by it); ones
            when None.

    Raises:
        ValueError: on arrays of mismatched shapes or slice indices out of range.
    """
    pre = np.asarray(pre, dtype=np.int64).ravel()
    post = np.asarray(post, dtype=np.int64).ravel()
    models = np.asarray(models, dtype=np.float64).reshape(-1, 6)
    if not (len(pre) == len(post) == len(models)):
        raise ValueError(
            f"pre, post and models differ in length: {len(pre)}, {len(post)}, {len(models)}"
        )
    if len(pre) and (min(pre.min(), post.min()) < 0 or max(pre.max(), post.max()) >= n):
        raise ValueError(f"pair slice indices must lie in 0..{n - 1}")
    weights = np.ones(len(pre)) if weights is None else np.asarray(weights, float).ravel()
    if len(weights) != len(pre) or not (weights > 0).all():
        raise ValueError(f"weights must be {len(pre)} numbers > 0")
    if regularization < 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
    solved = np.ones(n, dtype=bool) if excluded is None else ~np.asarray(excluded, dtype=bool)
    used = (pre != post) & np.isfinite(models).all(axis=1)
    pts = _virtual_points(size_xy)
    p_all = np.broadcast_to(pts, (len(pre), 4, 2))
    q_all = _apply_rows(models, p_all) if len(pre) else np.zeros((0, 4, 2))
    reg_weight = max(regularization, 1e-6) * max(size_xy) / 2.0
    transforms = np.tile(np.array([1.0, 0, 0, 1, 0, 0]), (n, 1))
    residual = np.zeros(len(pre))
    gaps: list[int] = []
    rounds = 0
    previous_local: np.ndarray | None = None
    while rounds < MAX_ROUNDS and solved.any():
        used &= solved[pre] & solved[post]
        idx = np.flatnonzero(solved)
        local = np.full(n, -1)
        local[idx] = np.arange(len(idx))
        lp, lq = local[pre[used]], local[post[used]]
        links = _gap_links(idx, np.minimum(lp, lq), np.maximum(lp, lq))
        gaps = [int(idx[b]) for _, b in links]
        identity_p = np.broadcast_to(pts, (len(links), 4, 2))
        all_pre = np.concatenate([lp, [a for a, _ in links]]).astype(np.int64)
        all_post = np.concatenate([lq, [b for _, b in links]]).astype(np.int64)
        p = np.concatenate([p_all[used], identity_p])
        q = np.concatenate([q_all[used], identity_p])
        w = np.concatenate([weights[used], np.ones(len(links))])
        x = None
        if previous_local is None or len(previous_local) != len(idx):
            x = _solve_once(len(idx), all_pre, all_post, p, q, 0, reg_weight, None, w)
        else:
            x = previous_local
        x = _solve_once(len(idx), all_pre, all_post, p, q, 0, reg_weight, x, w)
        rounds += 1
        previous_local = x
        transforms = np.tile(np.array([1.0, 0, 0, 1, 0, 0]), (n, 1))
        transforms[idx] = _mpicbg(x)
        residual = _residuals(transforms, pre, post, p_all, q_all)
        ok = residual[used]
        limit = max(robust_factor * float(np.median(ok)) if len(ok) else 0.0, robust_floor_px)
        # Drop the worst first: one wrong pair raises its neighbours' residuals too.
        worst = float(residual[used].max()) if used.any() else 0.0
        drop = used & (residual > max(limit, 0.75 * worst))
        # Slices without any kept pair cannot be placed by evidence: bridge them instead.
        keep_used = used & ~drop
        has_pair = np.zeros(n, dtype=bool)
        has_pair[pre[keep_used]] = True
        has_pair[post[keep_used]] = True
        lost = solved & ~has_pair
        if len(idx) == 1:
            lost[:] = False
        if not drop.any() and not lost.any():
            break
        used = keep_used
        solved &= ~lost
    transforms = _bridge(transforms, solved)
    residual = _residuals(transforms, pre, post, p_all, q_all)
    slice_res = np.zeros(n)
    if used.any():
        np.maximum.at(slice_res, pre[used], residual[used])
        np.maximum.at(slice_res, post[used], residual[used])
    return SolveResult(
        transforms=transforms,
        solved=solved,
        pair_used=used,
        pair_residual_px=residual,
        slice_residual_px=slice_res,
        gaps=gaps,
        rounds=rounds,
    )


def _residuals(
    transforms: np.ndarray, pre: np.ndarray, post: np.ndarray, p: np.ndarray, q: np.ndarray
) -> np.ndarray:
    """RMS px distance between ``G_pre(q)`` and ``G_post(p)`` per pair."""
    if len(pre) == 0:
        return np.zeros(0)
    d = _apply_rows(transforms[pre], q) - _apply_rows(transforms[post], p)
    return np.sqrt((d**2).sum(axis=-1).mean(axis=-1))
