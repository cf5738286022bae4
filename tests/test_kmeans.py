"""Weighted k-means against brute force and a plain-loop Lloyd reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvq_cli.calibration import kmeans as km
from kvq_cli.calibration import lloyd_step, weighted_kmeans, weighted_sse


def optimal_1d_sse(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Best weighted SSE over every contiguous partition of the sorted points (optimal in 1-D)."""
    order = x.argsort()
    xs, ws = x[order].double(), w[order].double()
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(xs)), k - 1):
        sse = 0.0
        for a, b in zip((0, *cuts), (*cuts, len(xs)), strict=True):
            mean = (ws[a:b] * xs[a:b]).sum() / ws[a:b].sum()
            sse += float((ws[a:b] * (xs[a:b] - mean) ** 2).sum())
        best = min(best, sse)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_1d_reaches_brute_force_optimum(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(6, generator=g), torch.randn(6, generator=g) * 0.3 + 2])  # (12,)
    w = torch.rand(12, generator=g) + 0.05
    c = weighted_kmeans(x, 3, w, n_init=4)
    assert c.shape == (3,) and torch.equal(c, c.sort().values)
    assert weighted_sse(x, c, w).item() == pytest.approx(optimal_1d_sse(x, w, 3), rel=1e-4)


def test_2d_reaches_brute_force_optimum() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, generator=g)
    w = torch.rand(9, generator=g) + 0.05
    best = float("inf")
    for labels in itertools.product((0, 1), repeat=8):  # point 0 in cluster 0: every 2-partition once
        lab = torch.tensor((0, *labels))
        sse = 0.0
        for j in (0, 1):
            m = lab == j
            if m.any():
                mean = (w[m, None] * x[m]).sum(0) / w[m].sum()
                sse += float((w[m] * ((x[m] - mean) ** 2).sum(1)).sum())
        best = min(best, sse)
    c = weighted_kmeans(x, 2, w, n_init=4)
    assert c.shape == (2, 2)
    assert weighted_sse(x, c, w).item() == pytest.approx(best, rel=1e-4)


def reference_lloyd_step(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One weighted Lloyd step with plain Python loops: ``x (N, d)``, ``c (k, d)``, ``w (N,)``."""
    sums = [[0.0] * x.shape[1] for _ in range(c.shape[0])]
    wsum = [0.0] * c.shape[0]
    for i in range(x.shape[0]):
        dists = [sum((float(x[i, t]) - float(c[j, t])) ** 2 for t in range(x.shape[1])) for j in range(c.shape[0])]
        j = dists.index(min(dists))
        wsum[j] += float(w[i])
        for t in range(x.shape[1]):
            sums[j][t] += float(w[i]) * float(x[i, t])
    return torch.tensor([[s / wsum[j] for s in sums[j]] for j in range(c.shape[0])])


@pytest.mark.parametrize("d", [1, 3])
def test_lloyd_step_matches_loop_reference(d: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 60, d, generator=g)  # (G, N, d)
    w = torch.rand(2, 60, generator=g) + 0.1
    c0 = x[:, :5].clone()  # distinct data points: no cluster is empty
    ref = torch.stack([reference_lloyd_step(x[i], c0[i], w[i]) for i in range(2)])  # (G, k, d)
    means, _, _ = lloyd_step(x, c0, w)
    assert torch.allclose(means, ref, atol=1e-5)
    one = weighted_kmeans(x, 5, w, iters=1, init=c0)  # the 1-D path (prefix sums) agrees as well
    assert torch.allclose(one, ref.sort(dim=1).values if d == 1 else ref, atol=1e-5)


def test_weights_pull_a_centroid() -> None:
    x = torch.linspace(0, 1, 11)  # (11,)
    w = torch.ones(11)
    w[3] = 1e6
    c = weighted_kmeans(x, 2, w)
    assert (c - x[3]).abs().min() < 1e-4
    assert (weighted_kmeans(x, 2) - x[3]).abs().min() > 0.05
    c2 = weighted_kmeans(torch.stack([x, x * 0.5], -1), 2, w)  # same in 2-D
    assert (c2 - torch.tensor([x[3], x[3] * 0.5])).norm(dim=1).min() < 1e-3


def test_batched_equals_separate_and_deterministic() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 400, 2, generator=g)
    w = torch.rand(3, 400, generator=g)
    batched = weighted_kmeans(x, 8, w, iters=20, seed=5)
    assert batched.shape == (3, 8, 2)
    assert torch.equal(batched, weighted_kmeans(x, 8, w, iters=20, seed=5))
    for i in range(3):
        single = weighted_kmeans(x[i : i + 1], 8, w[i : i + 1], iters=20, seed=5)[0]
        assert torch.allclose(batched[i], single, atol=1e-6)
    x1 = x[..., :1]  # (3, 400, 1): the sorted 1-D path
    c1 = weighted_kmeans(x1, 8, w)
    assert c1.shape == (3, 8, 1) and torch.equal(c1, c1.sort(dim=1).values)


def test_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 4, generator=g)
    full = weighted_kmeans(x, 16, iters=10)
    monkeypatch.setattr(km, "CHUNK_ELEMS", 16 * 23)  # 23 points per chunk
    assert torch.allclose(weighted_kmeans(x, 16, iters=10), full, atol=1e-5)


@pytest.mark.parametrize("d", [1, 2])
def test_empty_cluster_is_reseeded(d: int) -> None:
    blobs = torch.tensor([0.0, 5.0, 10.0]).repeat_interleave(20) + torch.linspace(-0.1, 0.1, 20).repeat(3)  # (60,)
    x = blobs[:, None].expand(-1, d).clone()  # (60, d)
    init = torch.tensor([[0.0], [1.0], [100.0]]).expand(-1, d)  # the last centroid attracts nothing
    c = weighted_kmeans(x, 3, init=init)
    assert torch.allclose(c[:, 0].sort().values, torch.tensor([0.0, 5.0, 10.0]), atol=0.05)


def test_zero_total_weight_is_unweighted() -> None:
    x = torch.randn(200, generator=torch.Generator().manual_seed(4))
    assert torch.equal(weighted_kmeans(x, 4, torch.zeros(200)), weighted_kmeans(x, 4))


def test_more_centroids_than_points() -> None:
    c = weighted_kmeans(torch.tensor([1.0, 1.0, 2.0]), 4)
    assert c.shape == (4,) and set(c.tolist()) == {1.0, 2.0}
    c2 = weighted_kmeans(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), 3)
    assert c2.shape == (3, 2) and torch.isfinite(c2).all()
