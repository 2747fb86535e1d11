"""CLG-CBM against a plain re-expression of its authors' computation (LAMDA-CL/C3Box `models/clg_cbm.py`,
`utils/inc_net.py::PrototypicalNet` / `::Gateway`) on small random inputs, in float64: the search's gate, loss and one Adam
step, the concept pick, the class statistics, relations and pseudo-features, the bottleneck's loss, one Adam step of it and
its logits. The references are written the authors' way (`nn.Sequential` gate, a list of per-task heads, `inv` of the
concept covariance, numpy argsort for the pick, one class at a time), so a difference is ours."""
import copy, os, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spa_toolkit.base import SpaError
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.method import TextSide
from spa_toolkit.peers.common import class_gaussians
from spa_toolkit.peers.clg_cbm import (ClgCbmKnobs, bottleneck_loss, clg_cbm_logits, clg_cbm_state_dict,
                                       clg_cbm_state_from_dict, concept_spread, gaussian_rows, nearest_unique,
                                       new_clg_cbm_state, new_gate, relations, search_loss, shifted_features,
                                       train_clg_cbm_task)

DT = torch.float64
EXACT = dict(rtol=1e-12, atol=1e-14)


# --- the authors' computations, re-expressed --------------------------------------------------------------------

def authors_configs(A):
    "`Learner.cluster`: mu, inv(cov), and the mean of `mahalanobis_distance` (stage 0) over each concept."
    mu, sigma_inv = A.mean(0), torch.linalg.inv(torch.cov(A.T))
    dists = [torch.diag((a - mu[None]) @ sigma_inv @ (a - mu[None]).T).mean() for a in A[:, None]]
    return mu, sigma_inv, torch.stack(dists).mean()


def authors_search_loss(gate, x, y, configs, power=5.0):
    "`_train_function` at stage 0: CE of `gate(x)` plus `_compute_loss('mahalanobis')`."
    mu, sigma_inv, mean_d = configs
    w = gate[0].weight / gate[0].weight.data.norm(dim=-1, keepdim=True)
    d = w - mu[None]
    mahal = torch.diag(d @ sigma_inv @ d.T).mean()
    return nn.CrossEntropyLoss()(gate(x), y) + torch.abs((mahal - mean_d) / mean_d ** power)


def authors_pick(centres, A, k):
    "`cluster`'s selection: each unit centre's nearest unseen attribute (numpy argsort), the first k kept."
    chosen, A = [], A.numpy()
    for c in centres.numpy():
        c = c / np.linalg.norm(c)
        for j in np.argsort(((A - c[None]) ** 2).sum(1)):
            if j not in chosen:
                chosen.append(j)
                break
    return chosen[:k]


def authors_forward(explainer, unity, x):
    "`PrototypicalNet.forward_explainer`: unit x, the concept layer, each task's head over the activations."
    csv = explainer(x / x.norm(dim=1, keepdim=True))
    return torch.cat([fc(csv) for fc in unity], dim=1), csv


def authors_stage1_loss(explainer, unity, bottleneck, x, y, sim=1.0):
    "`_train_function` at stage 1: CE + sim x `_similiarity_loss` + `_sparse_linear_loss`."
    logits, csv = authors_forward(explainer, unity, x)
    t, c = (x @ bottleneck.T) ** 3, csv ** 3
    t, c = t / torch.norm(t, p=2, dim=0, keepdim=True), c / torch.norm(c, p=2, dim=0, keepdim=True)
    W = torch.cat([fc.weight for fc in unity])
    sparse = 0.001 * 0.99 * W.norm(p=1) + 0.5 * 0.001 * 0.01 * (W ** 2).sum()
    return nn.CrossEntropyLoss()(logits, y) + sim * -(c * t).sum(0).mean() + sparse


def blobs(n, d, classes, gen, spread=0.5):
    centres = torch.randn(classes, d, generator=gen, dtype=DT)
    y = torch.arange(n) % classes
    return l2norm(centres[y] + spread * torch.randn(n, d, generator=gen, dtype=DT)), y


# --- stage 0: the concept search --------------------------------------------------------------------------------

def test_search_loss_and_one_adam_step_equal_the_authors():
    g = make_generator(0)
    A = l2norm(torch.randn(30, 5, generator=g, dtype=DT))  # 30 concepts in 5 dimensions: their inv is well posed
    x, y = blobs(24, 5, 3, g)
    ours = new_gate(5, 30, 3, make_generator(1)).to(DT)
    theirs = nn.Sequential(nn.Linear(5, 30, bias=False), nn.BatchNorm1d(30), nn.Linear(30, 3)).to(DT)
    theirs.load_state_dict(ours.state_dict())
    s, configs = concept_spread(A), authors_configs(A)
    torch.testing.assert_close(s.prec, configs[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.mean, configs[2], **EXACT)
    for net, loss in ((ours, lambda: search_loss(ours, x, y, s, 5.0)),
                      (theirs, lambda: authors_search_loss(theirs, x, y, configs))):
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        opt.zero_grad(); loss().backward(); opt.step()
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)  # weights and BatchNorm's running stats
    assert not torch.equal(ours[0].weight, new_gate(5, 30, 3, make_generator(1)).to(DT)[0].weight)  # it moved
    bare = new_gate(5, 30, 3, make_generator(1)).to(DT)  # the penalty alone, on a fresh gate: theirs to the last bit
    torch.testing.assert_close(search_loss(bare, x, y, s, 5.0) - search_loss(bare, x, y, None, 5.0),
                               authors_search_loss(bare, x, y, configs) - F.cross_entropy(bare(x), y), **EXACT)


@pytest.mark.parametrize("k", [4, 30])
def test_concept_pick_equals_the_authors(k):
    g = make_generator(2)
    A = l2norm(torch.randn(30, 5, generator=g, dtype=DT))
    centres = A[torch.randint(0, 30, (30,), generator=g)] + 0.3 * torch.randn(30, 5, generator=g, dtype=DT)
    assert nearest_unique(centres, A, k).tolist() == authors_pick(centres, A, k)


# --- statistics, relations, pseudo-features ---------------------------------------------------------------------

def test_statistics_relations_and_pseudo_features_equal_the_authors():
    g = make_generator(3)
    x, y = blobs(60, 4, 3, g)
    y = y + 2  # new classes 2, 3, 4 after two old ones
    old_means = torch.randn(2, 4, generator=g, dtype=DT)
    names = l2norm(torch.randn(2, 4, generator=g, dtype=DT))
    means, chol = class_gaussians(x, y, 2, 5, 1e-4, "CLG-CBM")
    for c in range(2, 5):  # `building_protos`, one class at a time
        torch.testing.assert_close(means[c - 2], x[y == c].mean(0), **EXACT)
        cov = torch.cov(x[y == c].T) + 1e-4 * torch.eye(4, dtype=DT)
        torch.testing.assert_close(chol[c - 2], torch.linalg.cholesky(cov), **EXACT)
    protos = torch.cat([old_means, means])
    rel = relations(names, means)
    want = torch.argmax(names @ (means / means.norm(dim=-1, keepdim=True)).T, dim=1)  # `_compute_relations`
    assert rel.tolist() == want.tolist()
    xs, ys = shifted_features(x, y, protos, rel)
    for c in range(2):  # `_build_feature_set`: the related new class's vectors - its proto + the old class's
        n = int(rel[c]) + 2
        torch.testing.assert_close(xs[ys == c], x[y == n] - protos[n] + protos[c], **EXACT)
    z = torch.randn(2, 3, 4, generator=make_generator(9, "cpu"), dtype=torch.float32).to(DT)
    xg, yg = gaussian_rows(means, chol, torch.tensor([2, 0]), 3, make_generator(9, "cpu"))
    for i, c in enumerate((2, 0)):  # `_sample`: randn @ cholesky(cov)^T + mean
        torch.testing.assert_close(xg[3 * i:3 * i + 3], z[i] @ chol[c].t() + means[c], **EXACT)
    assert yg.tolist() == [2, 2, 2, 0, 0, 0]


# --- stage 1: the bottleneck and the head -----------------------------------------------------------------------

def test_bottleneck_loss_one_adam_step_and_logits_equal_the_authors():
    g = make_generator(4)
    P, d, tasks = 7, 5, (3, 2)
    x, y = blobs(20, d, 5, g)
    x = torch.cat([x, 1.3 * x[:4] + 0.1])  # pseudo rows are not unit norm: the alignment reads them as given
    y = torch.cat([y, y[:4]])
    bottleneck = l2norm(torch.randn(P, d, generator=g, dtype=DT))
    explainer = nn.Linear(d, P, bias=False).to(DT)
    unity = nn.ModuleList([nn.Linear(P, m, bias=False).to(DT) for m in tasks])
    with torch.no_grad():
        for p in [explainer.weight, *(fc.weight for fc in unity)]: p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    e = explainer.weight.detach().clone().requires_grad_()
    h = torch.cat([fc.weight for fc in unity]).detach().clone().requires_grad_()
    torch.testing.assert_close(clg_cbm_logits(_state(e, h, bottleneck), x), authors_forward(explainer, unity, x)[0], **EXACT)
    knobs = ClgCbmKnobs()
    ours = bottleneck_loss(e, h, bottleneck, x, y, knobs)
    theirs = authors_stage1_loss(explainer, unity, bottleneck, x, y)
    torch.testing.assert_close(ours, theirs, **EXACT)
    for params, loss in (([e, h], ours), (list(explainer.parameters()) + list(unity.parameters()), theirs)):
        opt = torch.optim.Adam(params, lr=0.001, weight_decay=0.0)
        opt.zero_grad(); loss.backward(); opt.step()
    torch.testing.assert_close(e, explainer.weight, **EXACT)
    torch.testing.assert_close(h, torch.cat([fc.weight for fc in unity]), **EXACT)
    assert not torch.allclose(e, explainer.weight + 1e-6)  # compared values, not the same tensor
    torch.testing.assert_close(clg_cbm_logits(_state(e, h, bottleneck), x), authors_forward(explainer, unity, x)[0], **EXACT)


def _state(e, h, concepts):
    st = new_clg_cbm_state(_text(h.shape[0], e.shape[1]))
    st.explainer, st.head, st.concepts, st.n_seen = e.detach(), h.detach(), concepts, h.shape[0]
    return st


def _text(C, d, M=3, seed=5):
    g = make_generator(seed)
    sem = l2norm(torch.randn(C, M, d, generator=g, dtype=DT))
    return TextSide(l2norm(torch.randn(C, d, generator=g, dtype=DT)), sem, torch.ones(C, M, dtype=torch.bool))


# --- a task end to end, bad input, saving -------------------------------------------------------------------------

SMALL = ClgCbmKnobs(pool=2, search_epochs=3, epochs=3, milestones=(2,), batch_size=16)


def _two_tasks(knobs=SMALL, seed=0):
    g = make_generator(6)
    x, y = blobs(80, 5, 4, g)
    st, gen = new_clg_cbm_state(_text(4, 5), knobs), make_generator(seed)
    read = lambda r: (x[torch.as_tensor(r)], y[torch.as_tensor(r)])
    for cls in ([0, 1], [2, 3]): train_clg_cbm_task(st, read, np.flatnonzero(np.isin(y, cls)), cls, gen)
    return st, x, y, read


def test_two_tasks_grow_the_bottleneck_and_round_trip_through_a_dict(tmp_path):
    st, x, y, _ = _two_tasks()
    assert (st.n_seen, st.n_tasks, st.concepts.shape, st.explainer.shape, st.head.shape) == (4, 2, (8, 5), (8, 5), (4, 8))
    assert len(st.picked) == 8 and st.chol.shape == (4, 5, 5)
    torch.testing.assert_close(clg_cbm_logits(st, x), clg_cbm_logits(_two_tasks()[0], x), rtol=0, atol=0)
    torch.save(clg_cbm_state_dict(st), tmp_path / "s.pt")
    back = clg_cbm_state_from_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    torch.testing.assert_close(clg_cbm_logits(back, x), clg_cbm_logits(st, x), rtol=0, atol=0)
    assert back.knobs == st.knobs and back.picked == st.picked
    with pytest.raises(SpaError, match="rerun without --resume"): clg_cbm_state_from_dict({"version": 0})


def test_bad_input_fails_before_any_work():
    st, x, y, read = _two_tasks()
    for bad, msg in ((dict(regularizer="cosine"), "choose 'mahalanobis' or 'none'"), (dict(pool=0), "at least 1"),
                     (dict(lr=0.0), "must be > 0"), (dict(milestones=[3]), "pass tuple")):
        with pytest.raises(SpaError, match=msg): ClgCbmKnobs(**bad)
    with pytest.raises(SpaError, match="must continue right after the 4"):
        train_clg_cbm_task(st, read, np.arange(3), [5], make_generator(0))
    with pytest.raises(SpaError, match="text side has 4"):
        train_clg_cbm_task(st, read, np.arange(3), [4], make_generator(0))
    fresh = new_clg_cbm_state(_text(4, 5), SMALL)
    with pytest.raises(SpaError, match="fewer than 2 training images"):
        train_clg_cbm_task(fresh, read, np.flatnonzero(y == 0)[:1].tolist() + np.flatnonzero(y == 1).tolist(), [0, 1],
                           make_generator(0))
    with pytest.raises(SpaError, match="train a task first"): clg_cbm_logits(fresh, x)


@pytest.mark.slow
def test_cli_runs_clg_cbm_on_the_embedded_world(tmp_path):
    env = os.environ | dict(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                            OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "spa_toolkit.cli", "run", "--methods", "clg_cbm",
                        "--set", "clg_cbm.epochs=2", "--set", "clg_cbm.search_epochs=2", "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "clg_cbm" in p.stdout, p.stdout[-2000:]
