"""RanPAC and FeCAM against plain re-expressions of their authors' computations (LAMDA-CL/LAMDA-PILOT `models/ranpac.py`,
`models/fecam.py`) on small random inputs: RanPAC's hold-out errors, chosen penalty, closed-form head and logits; FeCAM's
class statistics and Mahalanobis distances. The references are written the authors' way (one solve per penalty, one
class at a time, `torch.corrcoef`, `torch.linalg.pinv` at scoring time), in float64, so a difference is ours."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.peers.fecam import (FecamKnobs, fecam_logits, fecam_stats, new_fecam_state, row_correlation,
                                     train_fecam_task)
from spa_toolkit.peers.ranpac import (RanpacKnobs, holdout_errors, new_ranpac_state, random_features,
                                      ranpac_logits, select_ridge, train_ranpac_task)

DT = torch.float64
RIDGES = 10.0 ** np.arange(-8, 9)


# --- the authors' computations, re-expressed --------------------------------------------------------------------

def authors_ridge_losses(features, Y):
    "`Learner.optimise_ridge_parameter`: fit the first 80% for each penalty by a solve, score the rest by MSE."
    n_fit, losses = int(features.shape[0] * 0.8), []
    Q, G = features[:n_fit].T @ Y[:n_fit], features[:n_fit].T @ features[:n_fit]
    for ridge in RIDGES:
        Wo = torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=G.dtype), Q).T
        losses.append(F.mse_loss(features[n_fit:] @ Wo.T, Y[n_fit:]))
    return torch.stack(losses), RIDGES[int(np.argmin([l.item() for l in losses]))]


def authors_ranpac(W, tasks, x_test):
    "`setup_RP` + `replace_fc` per task + `SimpleVitNet.forward` with its `CosineLinear` head (sigma = 1)."
    n_classes = sum(len(set(y.tolist())) for _, y in tasks)
    G, Q, scores = torch.zeros(W.shape[1], W.shape[1], dtype=DT), torch.zeros(W.shape[1], n_classes, dtype=DT), []
    seen = 0
    for x, y in tasks:
        H, Y = F.relu(x @ W), F.one_hot(y, n_classes).to(DT)
        Q, G = Q + H.T @ Y, G + H.T @ H
        ridge = authors_ridge_losses(H, Y)[1]
        seen += len(set(y.tolist()))
        Wo = torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=DT), Q).T[:seen]
        scores.append(F.linear(F.normalize(F.relu(x_test @ W), dim=1), F.normalize(Wo, dim=1)))
    return scores


def authors_fecam_distances(x, y, classes, vectors, alpha=100.0):
    "`replace_fc` (mean, cov, `shrink_cov`, `torch.corrcoef`) and `_maha_dist` / `_mahalanobis` (pinv), class by class."
    dists = []
    for c in classes:
        emb = x[y == c]
        cov = torch.corrcoef(torch.cov(emb.T) + alpha * torch.eye(x.shape[1], dtype=x.dtype))
        d = F.normalize(vectors, dim=-1) - F.normalize(emb.mean(0), dim=-1)
        dists.append(torch.diagonal(d @ torch.linalg.pinv(cov) @ d.T))
    return torch.stack(dists).T  # [N, C]


# --- RanPAC ---------------------------------------------------------------------------------------------------

def projected(n, M, gen, d=6):
    return random_features(torch.randn(n, d, generator=gen, dtype=DT), torch.randn(d, M, generator=gen, dtype=DT))


@pytest.mark.parametrize("n, M", [(200, 30), (50, 80)])  # more rows than projected dimensions, and fewer
def test_holdout_errors_equal_the_authors_loop(n, M):
    "With Y over all classes as theirs is: the same errors (where their solves are well posed) and the same penalty."
    g = make_generator(n)
    h = projected(n, M, g) + 0.1 * torch.rand(n, M, generator=g, dtype=DT)
    Y = F.one_hot(torch.randint(0, 5, (n,), generator=g), 7).to(DT)  # classes 5 and 6: later tasks' columns
    want, ridge = authors_ridge_losses(h, Y)
    got = holdout_errors(h, Y, int(n * 0.8), torch.tensor(RIDGES, dtype=DT))
    posed = slice(None) if n * 0.8 > M else slice(6, None)  # penalties >= 1e-2: their solve of rank-deficient G holds
    torch.testing.assert_close(got[posed], want[posed], rtol=1e-9, atol=0)
    assert select_ridge(h, Y[:, :5], RanpacKnobs()) == ridge  # the task's columns alone choose the same


def test_ranpac_head_and_logits_equal_the_authors_over_two_tasks():
    g = make_generator(7)
    x = l2norm(torch.randn(60, 6, generator=g, dtype=DT) + 2 * torch.eye(6, dtype=DT)[torch.arange(60) // 15])
    y = torch.arange(60) // 15
    st = new_ranpac_state(torch.zeros(4, 6, dtype=DT), seed=3, knobs=RanpacKnobs(rp_dim=40))
    gen, ref_gen, tasks = make_generator(5), make_generator(5), []
    for cls in ([0, 1], [2, 3]):
        rows = np.flatnonzero(np.isin(y, cls))
        train_ranpac_task(st, lambda r: (x[r], y[r]), rows, cls, gen)
        order = torch.randperm(len(rows), generator=ref_gen)  # the authors' shuffled loader, drawn as ours is
        tasks.append((x[rows][order], y[rows][order]))
    want = authors_ranpac(st.proj, tasks, x)
    torch.testing.assert_close(ranpac_logits(st, x), want[-1], rtol=1e-9, atol=1e-12)
    h = random_features(x, st.proj)
    torch.testing.assert_close(st.gram, h.T @ h)
    assert len(st.ridges) == 2 and (ranpac_logits(st, x).argmax(1) == y).float().mean() > 0.5


# --- FeCAM ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [100.0, 0.5])
def test_fecam_distances_equal_the_authors(alpha):
    g = make_generator(11)
    x = torch.randn(90, 5, generator=g, dtype=DT) + 3 * torch.eye(5, dtype=DT)[torch.arange(90) // 30]
    y = torch.arange(90) // 30
    st = new_fecam_state(torch.zeros(3, 5, dtype=DT), FecamKnobs(alpha=alpha))
    for cls in ([0], [1, 2]): train_fecam_task(st, lambda r: (x[r], y[r]), np.flatnonzero(np.isin(y, cls)), cls)
    probe = torch.randn(20, 5, generator=g, dtype=DT)
    want = authors_fecam_distances(x, y, range(3), probe, alpha)
    torch.testing.assert_close(-fecam_logits(st, probe), want, rtol=1e-9, atol=1e-12)
    assert (fecam_logits(st, probe).argmax(1) == want.argmin(1)).all()


def test_fecam_stats_survive_a_near_identity_correlation():
    """Class 84 of `bench_peers`' CIFAR-shaped random features (unit rows, 500 a class, d = 512): its shrunk correlation is
    nearly the identity, on which the SVD route of `pinv` failed to converge here (LAPACK's gesdd on this machine's CPU), so
    `fecam_stats` raised at task 9; the symmetric route gives the pseudo-inverse."""
    g = l2norm(torch.randn(100 * 500, 512, generator=make_generator(0)))[84 * 500:85 * 500]
    covs = torch.cov(g.T)[None]
    covs.diagonal(dim1=-2, dim2=-1).add_(100.0)
    _, prec = fecam_stats(g, torch.zeros(500, dtype=torch.long), range(1), 100.0)
    r = row_correlation(covs)  # rank d - 1 (its rows sum to zero): the cut-off drops one direction
    want = torch.linalg.pinv(r.double(), rtol=512 * torch.finfo(torch.float32).eps)  # float64, float32's cut-off
    torch.testing.assert_close(prec.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(r @ prec @ r, r, rtol=0, atol=1e-5)  # the Moore-Penrose conditions
    torch.testing.assert_close(prec @ r @ prec, prec, rtol=0, atol=1e-5)
