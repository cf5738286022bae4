"""Weighted, seeded k-means in torch (Lloyd iterations), batched over independent problems.

Shapes:
    x        ``(N, d)`` one problem, or ``(G, N, d)`` G independent problems (``(N,)`` is read as ``(N, 1)``).
    weights  ``(N,)`` or ``(G, N)`` non-negative (e.g. Fisher information); None = uniform.
    result   ``(k, d)`` or ``(G, k, d)`` float32 centroids (``(k,)`` for ``(N,)`` input).

Used for KVQuant's 1-D sensitivity-weighted codebooks (fast sorted path: no distance matrix at all), and
for coupled / product quantization (d up to 8, k up to 1024): the distance matrix is built in chunks so
memory stays bounded, and cluster sums are one-hot matmuls (deterministic on GPUs, unlike atomics).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements of one distance chunk ``(G, chunk, k)``.
CHUNK_ELEMS = 1 << 24


def weighted_kmeans(
    x: Tensor,
    k: int,
    weights: Tensor | None = None,
    iters: int = 50,
    seed: int = 0,
    init: Tensor | None = None,
    n_init: int = 1,
) -> Tensor:
    """Weighted k-means (minimizes ``sum_i w_i ||x_i - c_{a(i)}||^2``), on ``x``'s device.

    Parameters
    ----------
    x : Tensor
        ``(N, d)``, ``(G, N, d)`` or ``(N,)`` points.
    k : int
        Number of centroids.
    weights : Tensor, optional
        ``(N,)`` or ``(G, N)``; negative entries are treated as 0; a problem whose weights sum to 0 is
        solved unweighted.
    iters : int
        Maximum Lloyd iterations (stops early once assignments no longer change).
    seed : int
        Seed of the initialization (weighted k-means++ on a subsample). For d == 1 the first run needs no
        randomness: it starts from the optimal partition over up to 256 equal-count bins (exact for
        N <= 256), found by dynamic programming.
    init : Tensor, optional
        ``(k, d)`` or ``(G, k, d)`` starting centroids for the first run.
    n_init : int
        Runs from different starts (run r >= 1 uses k-means++ seeded ``seed + r``); the best weighted
        SSE per problem wins.

    Returns
    -------
    Tensor
        ``(k, d)`` / ``(G, k, d)`` / ``(k,)`` float32 centroids, sorted ascending when d == 1.
    """
    xb, wb, squeeze = _batched(x, weights)
    if k < 1:
        raise ValueError("k must be >= 1")
    one_d = xb.shape[-1] == 1
    if one_d:  # sort once: the 1-D init and iterations work on sorted points
        order = xb[..., 0].argsort(dim=1)  # (G, N)
        xb, wb = xb.gather(1, order[..., None]), wb.gather(1, order)
    best, best_sse = None, None
    for run in range(max(1, n_init)):
        c0 = None
        if run == 0 and init is not None:
            c0 = init.to(xb.device, torch.float32).reshape(-1, k, xb.shape[-1]).expand(xb.shape[0], -1, -1).clone()
        elif run == 0 and one_d:
            c0 = _dp_init_1d(xb[..., 0], wb, k)
        if c0 is None:
            c0 = _kmeanspp_init(xb, wb, k, seed + run)  # (G, k, d)
        c = _lloyd_1d(xb[..., 0], wb, c0[..., 0], iters)[..., None] if one_d else _lloyd(xb, wb, c0, iters)
        if n_init <= 1:
            best = c
            break
        sse = _sse(xb, wb, c)
        if best is None:
            best, best_sse = c, sse
        else:
            better = sse < best_sse
            best = torch.where(better[:, None, None], c, best)
            best_sse = torch.where(better, sse, best_sse)
    assert best is not None
    if xb.shape[-1] == 1:
        best = best.sort(dim=1).values
    if squeeze == "1d":
        return best[0, :, 0]
    return best[0] if squeeze == "2d" else best


def assign(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each point, in chunks: ``x (G, N, d)``, ``centroids (G, k, d)``.

    Returns the index and the squared distance of the nearest centroid, both ``(G, N)``.
    """
    idx, dist, _, _ = _sweep(x, centroids, None)
    return idx, dist


def lloyd_step(x: Tensor, centroids: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One Lloyd step without re-seeding: ``x (G, N, d)``, ``centroids (G, k, d)``, ``weights (G, N)``.

    Returns the weighted means ``(G, k, d)`` (an empty cluster keeps its centroid), the cluster weights
    ``(G, k)`` and the assignment ``(G, N)``.
    """
    w = torch.ones(x.shape[:2], device=x.device) if weights is None else weights
    idx, _, sums, wsum = _sweep(x, centroids, w)
    means = torch.where(wsum[..., None] > 0, sums / wsum.clamp_min(1e-300)[..., None], centroids.double())
    return means.float(), wsum.float(), idx


def weighted_sse(x: Tensor, centroids: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted sum of squared distances to the nearest centroid, one per problem: ``(G,)`` (or a scalar for 2-D x)."""
    xb, wb, squeeze = _batched(x, weights)
    c = centroids.to(xb.device, torch.float32)
    c = {1: c.reshape(1, -1, 1), 2: c[None], 3: c}[c.dim()]  # (G or 1, k, d)
    out = _sse(xb, wb, c.expand(xb.shape[0], -1, -1))
    return out if squeeze == "3d" else out[0]


# ---- internals ---------------------------------------------------------------------------------


def _batched(x: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor, str]:
    """``(G, N, d)`` float32 points and ``(G, N)`` weights (non-negative, no all-zero problem)."""
    if x.dim() not in (1, 2, 3):
        raise ValueError(f"x must be (N,), (N, d) or (G, N, d), got {tuple(x.shape)}")
    squeeze = f"{x.dim()}d"
    xb = {1: x.reshape(1, -1, 1), 2: x[None], 3: x}[x.dim()].float()  # (G, N, d)
    G, N, _ = xb.shape
    if weights is None:
        wb = torch.ones(G, N, device=xb.device)
    else:
        wb = weights.to(xb.device, torch.float32).reshape(G, N).clamp_min(0)
        wb = torch.where(wb.sum(1, keepdim=True) > 0, wb, torch.ones_like(wb))  # zero total weight: unweighted
    return xb, wb, squeeze


def _sweep(x: Tensor, c: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunked pass: nearest index and squared distance ``(G, N)``; with weights also the weighted
    cluster sums ``(G, k, d)`` and cluster weights ``(G, k)`` (float64; left at zero without weights)."""
    G, N, d = x.shape
    k = c.shape[1]
    chunk = max(1, CHUNK_ELEMS // max(1, G * k))
    c_sq = (c * c).sum(-1)  # (G, k)
    idx = torch.empty(G, N, dtype=torch.long, device=x.device)
    dist = torch.empty(G, N, dtype=torch.float32, device=x.device)
    sums = torch.zeros(G, k, d, dtype=torch.float64, device=x.device)
    wsum = torch.zeros(G, k, dtype=torch.float64, device=x.device)
    for s in range(0, N, chunk):
        xc = x[:, s : s + chunk]  # (G, n, d)
        d2 = (xc * xc).sum(-1, keepdim=True) - 2 * xc @ c.transpose(1, 2) + c_sq[:, None, :]  # (G, n, k)
        m = d2.min(-1)
        idx[:, s : s + chunk] = m.indices
        dist[:, s : s + chunk] = m.values.clamp_min(0)
        if w is not None:
            onehot = d2.zero_().scatter_(2, m.indices[..., None], w[:, s : s + chunk, None])  # (G, n, k) weighted
            sums += (onehot.transpose(1, 2) @ xc).double()  # (G, k, d)
            wsum += onehot.sum(1).double()
    return idx, dist, sums, wsum


def _dp_init_1d(xs: Tensor, w: Tensor, k: int, max_bins: int = 256) -> Tensor | None:
    """Optimal 1-D start: the best weighted partition of sorted ``xs, w (G, N)`` into k contiguous segments.

    Segment edges are restricted to those of B equal-count bins (B = N when N is small: then the partition is
    the exact optimum, which is a Lloyd fixed point). Dynamic programme over prefix sums, ``(G, B+1, B+1)``
    costs. Returns the segment means ``(G, k, 1)``, or None when k > B.
    """
    G, N = xs.shape
    B = min(N, max_bins, max(k, int((CHUNK_ELEMS // (4 * G)) ** 0.5)))  # G * B^2 <= CHUNK_ELEMS / 4
    if k > B:
        return None
    edges = torch.linspace(0, N, B + 1, device=xs.device).round().long()  # (B + 1,) bin edges in points
    zero = torch.zeros(G, 1, dtype=torch.float64, device=xs.device)
    xd, wd = xs.double(), w.double()
    pw, ps, pq = (torch.cat([zero, v.cumsum(1)], 1)[:, edges] for v in (wd, wd * xd, wd * xd * xd))  # (G, B + 1)
    W = pw[:, None, :] - pw[:, :, None]  # (G, B + 1, B + 1): [a, b] = weight of bins a .. b - 1
    S = ps[:, None, :] - ps[:, :, None]
    cost = ((pq[:, None, :] - pq[:, :, None]) - S * S / W.clamp_min(1e-300)).clamp_min(0)
    idx = torch.arange(B + 1, device=xs.device)
    cost = cost.masked_fill(idx[:, None] >= idx[None, :], float("inf"))  # segments need a < b
    dp, back = cost[:, 0], []  # dp[b]: best cost of bins [0, b) in j + 1 segments
    for _ in range(1, k):
        m = (dp[:, :, None] + cost).min(1)  # over the last segment's start a
        dp = m.values
        back.append(m.indices)
    bounds = [torch.full((G,), B, device=xs.device)]
    for arg in reversed(back):
        bounds.append(arg.gather(1, bounds[-1][:, None])[:, 0])
    bounds.append(torch.zeros(G, dtype=torch.long, device=xs.device))
    b = torch.stack(bounds[::-1], 1)  # (G, k + 1) segment edges in bins
    wsum = pw.gather(1, b[:, 1:]) - pw.gather(1, b[:, :-1])
    mean = (ps.gather(1, b[:, 1:]) - ps.gather(1, b[:, :-1])) / wsum.clamp_min(1e-300)
    first = xs.gather(1, edges[b[:, :-1]])  # zero-weight segment: its first point
    return torch.where(wsum > 0, mean, first.double()).float()[..., None]


def _kmeanspp_init(x: Tensor, w: Tensor, k: int, seed: int, max_sample: int = 1 << 15) -> Tensor:
    """Weighted k-means++ on a seeded subsample of at most ``max(max_sample, 8k)`` points: ``(G, k, d)``.

    The random draws (subsample, one uniform per centroid) depend only on N, k and the seed, so a problem
    gets the same start alone or in a batch, on any device.
    """
    G, N, d = x.shape
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same start on every device
    n = min(N, max(max_sample, 8 * k))
    sub = (torch.randperm(N, generator=gen)[:n] if n < N else torch.arange(N)).to(x.device)
    u = torch.rand(k, generator=gen, dtype=torch.float64).to(x.device)
    xs, ws = x[:, sub], w[:, sub]  # (G, n, d), (G, n)
    rows = torch.arange(G, device=x.device)
    c = torch.empty(G, k, d, device=x.device)
    d2 = torch.full((G, n), float("inf"), device=x.device)
    p = ws
    for j in range(k):
        p = torch.where(p.sum(1, keepdim=True) > 0, p, torch.ones_like(p))  # all covered: any point
        cdf = p.double().cumsum(1)  # (G, n)
        pick = torch.searchsorted(cdf, u[j] * cdf[:, -1:], right=True).clamp_max(n - 1)[:, 0]  # (G,)
        c[:, j] = xs[rows, pick]
        d2 = torch.minimum(d2, ((xs - c[:, j : j + 1]) ** 2).sum(-1))
        p = ws * d2
    return c


def _lloyd(x: Tensor, w: Tensor, c: Tensor, iters: int) -> Tensor:
    """Lloyd iterations with deterministic re-seeding of empty clusters: ``(G, k, d)``."""
    prev = None
    for _ in range(iters):
        idx, dist, sums, wsum = _sweep(x, c, w)
        c_new = torch.where(wsum[..., None] > 0, sums / wsum.clamp_min(1e-300)[..., None], c.double()).float()
        empty = wsum <= 0
        if empty.any():
            for g in torch.nonzero(empty.any(1)).flatten().tolist():
                js = torch.nonzero(empty[g]).flatten()
                far = (w[g] * dist[g]).topk(len(js)).indices  # worst-served points become centroids
                c_new[g, js] = x[g, far]
        c = c_new
        if prev is not None and torch.equal(idx, prev) and not empty.any():
            break
        prev = idx
    return c


def _lloyd_1d(xs: Tensor, w: Tensor, c: Tensor, iters: int) -> Tensor:
    """1-D Lloyd with prefix sums (no distance matrix): ``xs, w (G, N)`` sorted along N, ``c (G, k)``."""
    G, N = xs.shape
    zero = torch.zeros(G, 1, dtype=torch.float64, device=xs.device)
    cw = torch.cat([zero, w.double().cumsum(1)], 1)  # (G, N + 1)
    cwx = torch.cat([zero, (w.double() * xs.double()).cumsum(1)], 1)
    c = c.sort(dim=1).values
    prev = None
    for _ in range(iters):
        mids = (c[:, 1:] + c[:, :-1]) / 2  # (G, k - 1)
        last = torch.full((G, 1), N, device=xs.device)
        ends = torch.cat([torch.searchsorted(xs, mids.contiguous(), right=True), last], 1)  # (G, k) segment ends
        starts = torch.cat([torch.zeros(G, 1, dtype=torch.long, device=xs.device), ends[:, :-1]], 1)  # (G, k)
        wsum = cw.gather(1, ends) - cw.gather(1, starts)
        xsum = cwx.gather(1, ends) - cwx.gather(1, starts)
        empty = wsum <= 0
        c_new = torch.where(empty, c.double(), xsum / wsum.clamp_min(1e-300)).float()
        if empty.any():
            a = torch.searchsorted(mids.contiguous(), xs)  # (G, N) cluster of each sorted point
            err = w * (xs - c.gather(1, a)) ** 2
            for g in torch.nonzero(empty.any(1)).flatten().tolist():
                js = torch.nonzero(empty[g]).flatten()
                c_new[g, js] = xs[g, err[g].topk(len(js)).indices]
        c = c_new.sort(dim=1).values
        if prev is not None and torch.equal(ends, prev) and not empty.any():
            break
        prev = ends
    return c


def _sse(x: Tensor, w: Tensor, c: Tensor) -> Tensor:
    """Weighted SSE per problem ``(G,)``."""
    _, dist = assign(x, c)
    return (w.double() * dist.double()).sum(1)
