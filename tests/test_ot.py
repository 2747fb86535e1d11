"Batched entropic OT against POT: plans, scores, the exact-OT limit, gradients, precision, masks and bad inputs."
import warnings

import numpy as np
import ot
import pytest
import torch

from spa_toolkit.core import SpaError, l2norm
import spa_toolkit.ot as ot_module
from spa_toolkit.ot import label_ot_scores, ot_score, patch_ot_scores, sinkhorn
from spa_toolkit.patches import gather_patches, select_patches


def gen(seed=0): return torch.Generator().manual_seed(seed)

def unit(*shape, seed=0, dtype=torch.float64): return l2norm(torch.randn(*shape, generator=gen(seed), dtype=dtype))

def pot_plan(a, b, C, eps, ot_iters=5000):
    "POT's log-domain Sinkhorn on one problem (float64 numpy)."
    return ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=ot_iters, stopThr=1e-14)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_plans_match_pot_loop(eps):
    Z, T = unit(6, 16, 32, seed=1), unit(6, 8, 32, seed=2)
    C = 1 - Z @ T.transpose(-1, -2)
    plan = sinkhorn(C, eps=eps, ot_iters=5000, tol=1e-13)
    ref = np.stack([pot_plan(np.full(16, 1 / 16), np.full(8, 1 / 8), c.numpy(), eps) for c in C])
    assert np.abs(plan.numpy() - ref).max() < 1e-6


def test_plans_match_pot_with_weights_and_leading_dims():
    C = 2 * torch.rand(2, 3, 10, 6, dtype=torch.float64, generator=gen(3))
    a = torch.rand(2, 1, 10, dtype=torch.float64, generator=gen(4)) + 0.1
    b = torch.rand(3, 6, dtype=torch.float64, generator=gen(5)) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    plan = sinkhorn(C, eps=0.2, a=a, b=b, ot_iters=5000, tol=1e-13)
    for i in range(2):
        for j in range(3):
            ref = pot_plan(a[i, 0].numpy(), b[j].numpy(), C[i, j].numpy(), 0.2)
            assert np.abs(plan[i, j].numpy() - ref).max() < 1e-6


def test_plans_match_pot_batch_solver():
    C = 1 - unit(32, 16, 16, seed=6) @ unit(32, 8, 16, seed=7).transpose(-1, -2)
    ref = ot.batch.solve_batch(C, 0.1, max_iter=5000, tol=1e-13, method="log_sinkhorn").plan
    assert (sinkhorn(C, eps=0.1, ot_iters=5000, tol=1e-13) - ref).abs().max() < 1e-6


def test_scores_match_pot_loop():
    Z, T = unit(5, 16, 32, seed=8), unit(5, 8, 32, seed=9)
    s = ot_score(Z, T, eps=0.1, eps_relative=False, ot_iters=3000)
    S = (Z @ T.transpose(-1, -2)).numpy()
    ref = [1 - ot.sinkhorn2(np.full(16, 1 / 16), np.full(8, 1 / 8), 1 - S[i], 0.1, method="sinkhorn_log", numItermax=3000,
                            stopThr=1e-14) for i in range(5)]
    assert np.abs(s.numpy() - np.array(ref)).max() < 1e-6


def test_score_approaches_exact_ot_as_eps_shrinks():
    Z, T = unit(3, 6, 8, seed=10), unit(3, 4, 8, seed=11)
    S = Z @ T.transpose(-1, -2)
    exact = torch.tensor([1 - ot.emd2(np.full(6, 1 / 6), np.full(4, 1 / 4), 1 - s.numpy()) for s in S], dtype=torch.float64)
    gaps = [float((ot_score(Z, T, eps=eps, eps_relative=False, ot_iters=20000) - exact).abs().max()) for eps in (0.1, 0.03, 0.01, 0.003)]
    assert all(g1 > g2 for g1, g2 in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 5e-3, gaps


def test_marginals_uniform_and_masked():
    C = 1 - unit(4, 16, 32, seed=12) @ unit(4, 8, 32, seed=13).transpose(-1, -2)
    plan = sinkhorn(C, eps=0.1, ot_iters=500, tol=1e-12)
    assert torch.allclose(plan.sum(-1), torch.full((4, 16), 1 / 16, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(plan.sum(-2), torch.full((4, 8), 1 / 8, dtype=torch.float64), atol=1e-10)
    mask = torch.tensor([True] * 5 + [False] * 3)
    pm = sinkhorn(C, eps=0.1, b=mask / mask.sum(), ot_iters=500)
    assert pm[..., 5:].abs().max() == 0
    assert torch.allclose(pm.sum(-2)[..., :5], torch.full((4, 5), 0.2, dtype=torch.float64), atol=1e-10)


def test_tol_stops_early_and_warns_when_short(monkeypatch):
    C = 1 - unit(8, 16, 32, seed=14) @ unit(8, 8, 32, seed=15).transpose(-1, -2)
    checks = []
    monkeypatch.setattr(ot_module, "_col_error", lambda *a, f=ot_module._col_error: checks.append(1) or f(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        early = sinkhorn(C, eps=0.1, ot_iters=5000, tol=1e-10)
    assert 0 < len(checks) < 5000 // 10  # checked every 10 sweeps, and stopped well before the last one
    assert torch.allclose(early, sinkhorn(C, eps=0.1, ot_iters=5000), atol=1e-9)
    with pytest.warns(UserWarning, match="raise ot_iters or eps"):
        sinkhorn(C, eps=0.01, ot_iters=3, tol=1e-12)


def test_gradcheck_full_autograd():
    Z, T = unit(2, 5, 6, seed=16).requires_grad_(), unit(2, 3, 6, seed=17).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.autograd.gradcheck(lambda z, t: ot_score(z, t, eps=0.2, ot_iters=30, detach_plan=False, eps_relative=False), (Z, T))
    assert torch.autograd.gradcheck(lambda z, t: ot_score(z, t, eps=0.2, mask=mask, ot_iters=30, detach_plan=False, eps_relative=False), (Z, T))


def test_detached_gradient_is_the_envelope_gradient():
    "With the plan held constant, the gradient is that of the regularised value 1 - (<P, C> - eps H(P)), checked numerically."
    eps = 0.2
    def reg_value(z, t):
        C = 1 - z @ t.T
        P = sinkhorn(C, eps=eps, ot_iters=3000, tol=1e-14)
        return 1 - ((P * C).sum() + eps * (P * (P.log() - 1)).sum())
    Z, T = unit(4, 5, seed=18), unit(3, 5, seed=19)
    gz, gt = torch.autograd.grad(ot_score(Z.requires_grad_(), T.requires_grad_(), eps=eps, eps_relative=False, ot_iters=3000), (Z, T))
    for x, g in ((Z, gz), (T, gt)):
        for idx in np.ndindex(*x.shape):
            h = torch.zeros_like(x); h[idx] = 1e-6
            args = (Z.detach() + h, T.detach()) if x is Z else (Z.detach(), T.detach() + h)
            args_m = (Z.detach() - h, T.detach()) if x is Z else (Z.detach(), T.detach() - h)
            assert abs(float(reg_value(*args) - reg_value(*args_m)) / 2e-6 - float(g[idx])) < 1e-6


def test_masked_tokens_get_zero_gradient_and_no_nan():
    Z, T = unit(3, 16, 32, seed=20).requires_grad_(), unit(3, 8, 32, seed=21).requires_grad_()
    mask = torch.tensor([True] * 5 + [False] * 3)
    for detach in (True, False):
        gz, gt = torch.autograd.grad(ot_score(Z, T, mask=mask, eps_relative=False, ot_iters=50, detach_plan=detach).sum(), (Z, T))
        assert torch.isfinite(gz).all() and torch.isfinite(gt).all()
        assert gt[:, 5:].abs().max() == 0 and gt[:, :5].abs().max() > 0


@pytest.mark.parametrize("detach", [True, False])
def test_nan_free_small_eps_float32(detach):
    Z, T = unit(64, 16, 64, seed=22, dtype=torch.float32).requires_grad_(), unit(64, 8, 64, seed=23, dtype=torch.float32)
    T = T.requires_grad_()
    s = ot_score(Z, T, eps=0.01, eps_relative=False, ot_iters=200, detach_plan=detach)
    gz, gt = torch.autograd.grad(s.sum(), (Z, T))
    assert torch.isfinite(s).all() and torch.isfinite(gz).all() and torch.isfinite(gt).all()
    extreme = torch.cat([torch.zeros(8, 16, 8), 2 * torch.ones(8, 16, 8)])  # cosine costs at both ends of [0, 2]
    assert torch.isfinite(sinkhorn(extreme, eps=0.01, ot_iters=200)).all()


def test_half_precision_is_upcast():
    Z, T = unit(8, 16, 32, seed=24, dtype=torch.float32), unit(8, 8, 32, seed=25, dtype=torch.float32)
    ref = ot_score(Z, T, ot_iters=100)
    sb = ot_score(Z.bfloat16(), T.bfloat16(), ot_iters=100)
    assert sb.dtype == torch.float32 and (sb - ref).abs().max() < 2e-2
    plan = sinkhorn(1 - Z.half() @ T.half().transpose(-1, -2), eps=0.01, ot_iters=100)
    assert plan.dtype == torch.float16 and torch.isfinite(plan).all()


def test_clear_errors():
    Z, T, C = unit(2, 16, 32), unit(2, 8, 32), torch.rand(2, 16, 8, dtype=torch.float64)
    cases = [(lambda: ot_score(Z, T[..., :16]), "same d"),
             (lambda: ot_score(Z, T[:1].expand(3, -1, -1)), "do not broadcast"),
             (lambda: ot_score(Z.clone().fill_(float("nan")), T), "selected patches Z holds"),
             (lambda: ot_score(Z, T * float("inf")), "semantic tokens T holds"),
             (lambda: ot_score(Z, T, mask=torch.zeros(8, dtype=torch.bool)), "all False"),
             (lambda: ot_score(Z, T, mask=torch.ones(7, dtype=torch.bool)), "has 7 entries but there are 8"),
             (lambda: sinkhorn(C, a=torch.ones(15) / 15), "has 15 weights but the cost matrix has 16"),
             (lambda: sinkhorn(C, b=-torch.ones(8) / 8), "negative weights"),
             (lambda: sinkhorn(C, b=torch.full((8,), float("nan"))), "target marginal b holds"),
             (lambda: sinkhorn(C, a=torch.ones(16) / 8), "different total mass"),
             (lambda: sinkhorn(C, eps=-0.1), "must be positive"),
             (lambda: sinkhorn(C, ot_iters=0), "at least one iteration"),
             (lambda: sinkhorn(C[0, 0]), "must be [..., n, m]")]
    for f, msg in cases:
        with pytest.raises(SpaError) as e: f()
        assert msg in str(e.value), (msg, str(e.value))


def test_patch_ot_scores_chunked_equals_unchunked_and_loop():
    P, T = unit(6, 40, 16, seed=26, dtype=torch.float32), unit(9, 5, 16, seed=27, dtype=torch.float32)
    mask = torch.rand(9, 5, generator=gen(28)) > 0.4; mask[:, 0] = True
    full = patch_ot_scores(P, T, k_patches=8, mask=mask)
    for chunk in (1, 4, 9, 20):
        assert torch.allclose(patch_ot_scores(P, T, k_patches=8, mask=mask, class_chunk=chunk), full, atol=1e-6)
    loop = torch.stack([torch.stack([ot_score(P[b, (P[b] @ T[c][mask[c]].T).amax(1).topk(8).indices], T[c][mask[c]])
                                     for c in range(9)]) for b in range(6)])
    assert torch.allclose(full, loop, atol=1e-5)
    agn = patch_ot_scores(P, T, k_patches=8, mask=mask, selection="agnostic")
    assert torch.allclose(patch_ot_scores(P, T, k_patches=8, mask=mask, selection="agnostic", class_chunk=2), agn, atol=1e-6)
    assert torch.allclose(agn, ot_score(gather_patches(P, select_patches(P, T, 8, mask, agnostic=True)), T, mask=mask), atol=1e-5)


def test_label_path_matches_and_trains():
    P, T = unit(6, 40, 16, seed=29).requires_grad_(), unit(9, 5, 16, seed=30).requires_grad_()
    y = torch.tensor([0, 8, 3, 3, 1, 5])
    s = label_ot_scores(P, T, y, k_patches=8)
    assert torch.allclose(s, patch_ot_scores(P, T, k_patches=8)[torch.arange(6), y])
    gp, gt = torch.autograd.grad(s.sum(), (P, T))
    assert (gp.abs().sum((1, 2)) > 0).all()                       # every image's selected patches get a gradient
    assert (gt.abs().sum((1, 2)) > 0).tolist() == [c in y.tolist() for c in range(9)]  # only the labels' tokens
    gp2, = torch.autograd.grad(patch_ot_scores(P, T, k_patches=8, detach_plan=False).sum(), (P,))
    assert torch.isfinite(gp2).all()


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
@pytest.mark.parametrize("ot_iters", [1, 2, 3, 7])
def test_each_sweep_matches_pot_without_stopping(ot_iters):
    "POT with stopThr=0 runs exactly numItermax sweeps of the same updates: the iterates agree, not only the limits."
    C = 1 - unit(6, 8, seed=1) @ unit(4, 8, seed=2).T  # [6, 4] cosine costs
    a, b = np.full(6, 1 / 6), np.full(4, 1 / 4)
    ours = sinkhorn(C, eps=0.1, ot_iters=ot_iters).numpy()
    theirs = ot.sinkhorn(a, b, C.numpy(), 0.1, method="sinkhorn_log", numItermax=ot_iters, stopThr=0)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    if ot_iters < 7: assert not np.allclose(ours, sinkhorn(C, eps=0.1, ot_iters=ot_iters + 1).numpy(), atol=1e-9)  # one sweep shows


def test_non_unit_vectors_are_refused():
    Z, T = unit(3, 4, 8, seed=1), unit(5, 8, seed=2)
    with pytest.raises(SpaError, match=r"the selected patches Z must have unit-norm rows.*pass l2norm"): ot_score(3 * Z, T)
    with pytest.raises(SpaError, match=r"the semantic tokens T must have unit-norm rows"): ot_score(Z, T / 2)
