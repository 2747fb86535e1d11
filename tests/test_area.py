"""AREA against a plain re-expression of its authors' computation (LAMDA-CL/ICML2026-AREA @ 1490acc: `models/area.py`,
`utils/inc_net.py::Area`) on small random inputs, in float64: the log map and the geodesic bases, the logits, two SGD steps
of a task with Gaussian replay, the class statistics, the optimal-transport routing (their 50 Sinkhorn sweeps) and the
routed test logits. The references are written the authors' way (an `nn.Module` with `einops.einsum`, masks for the log
map, one class and one image at a time, the optimizer over every parameter), so a difference is ours. A last test shows
the tolerances catch a wrong implementation: one constant changed, each comparison fails. Then the description files."""
import copy, json, os, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum

from spa_toolkit.base import SpaError
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.method import TextSide
from spa_toolkit.peers.common import class_gaussians
from spa_toolkit.world import synthetic_world
from spa_toolkit.peers.area import (AreaKnobs, area_logits, area_scores, area_state_dict, area_state_from_dict,
                                    fit_area, geodesic_basis, log_map,
                                    new_area_state, route_values, train_area_task)

DT = torch.float64
EXACT = dict(rtol=1e-12, atol=1e-12)


# --- the authors' computations, re-expressed --------------------------------------------------------------------

def authors_log_map(x, mu):
    "`Learner.log_map`."
    cos_theta = torch.clamp(torch.matmul(x, mu.reshape(-1)), -1.0 + 1e-6, 1.0 - 1e-6)
    theta = torch.acos(cos_theta)
    coeff = theta / (torch.sqrt(1 - cos_theta ** 2) + 1e-6)
    mask = theta > 1e-4
    scaling = torch.ones_like(coeff)
    scaling[mask] = coeff[mask]
    return scaling.unsqueeze(1) * (x - cos_theta.unsqueeze(1) * mu.unsqueeze(0))


def authors_basis(data, K):
    "`_get_visual_base_matrix` / `_get_textual_base_matrix` for one class."
    mu_c = F.normalize(torch.mean(data, dim=0, keepdim=True), dim=-1)
    u = authors_log_map(data, mu_c).squeeze(0)
    _, _, Vh = torch.linalg.svd(u.cpu(), full_matrices=False)
    return Vh[:K, :].t()


class AuthorsArea(nn.Module):
    "`utils/inc_net.py::Area` without the CLIP model: its adapters, scorer lists, `append_S` and `forward`."
    def __init__(self, D, K):
        super().__init__()
        self.K = K
        self.visual_adapter = nn.Linear(D, D, bias=False)
        self.textual_adapter = nn.Linear(D, D, bias=False)
        self.textual_S, self.visual_S = nn.ModuleList(), nn.ModuleList()

    def append_S(self, D):
        self.textual_S.append(nn.Linear(D, self.K, bias=False))
        self.visual_S.append(nn.Linear(D, self.K, bias=False))
        if len(self.textual_S) > 1:
            self.textual_S[-1].weight.data = self.textual_S[-2].weight.data.clone()
            self.visual_S[-1].weight.data = self.visual_S[-2].weight.data.clone()

    def forward(self, image_features, text_embeddings, visual_basis, textual_basis, cur_task, scale, memory_data=None):
        if memory_data is not None: image_features = torch.cat([image_features, memory_data], dim=0)
        res = self.visual_adapter(image_features.detach())
        ev = einsum(visual_basis, self.visual_S[cur_task](image_features), "C D K, B K -> B C D")
        image_features = res.unsqueeze(1).expand(-1, textual_basis.shape[0], -1) + ev
        tres = self.textual_adapter(text_embeddings.detach())
        tev = einsum(textual_basis, self.textual_S[cur_task](text_embeddings.detach()), "C D K, C K -> C D")
        textual_features = tres + tev
        image_features = image_features / (image_features.norm(dim=-1, keepdim=True) + 1e-6)
        textual_features = textual_features / (textual_features.norm(dim=-1, keepdim=True) + 1e-6)
        return einsum(image_features, textual_features, "B C D, C D -> B C") * scale


def authors_sinkhorn_distance(cost_matrix, eps=0.1):
    "`Learner._sinkhorn_distance`, its 50 sweeps as written."
    B, N_b = cost_matrix.shape
    mu = torch.ones(B, 1, dtype=cost_matrix.dtype)
    nu = torch.ones(B, N_b, dtype=cost_matrix.dtype) / N_b
    f, g = torch.zeros(B, 1, dtype=cost_matrix.dtype), torch.zeros(B, N_b, dtype=cost_matrix.dtype)
    log_K = -cost_matrix / eps
    for _ in range(50):
        f = torch.log(mu) - torch.logsumexp(g + log_K, dim=1, keepdim=True)
        g = torch.log(nu) - (f + log_K)
    return (f * mu).sum(dim=1) + (g * nu).sum(dim=1)


def authors_route(x, vb, task_sizes, eps=0.1):
    "`get_most_similar_task` for one image [1, D]: the Sinkhorn value of each task, then its argmax."
    dists = []
    for t in range(len(task_sizes) - 1):
        basis = vb[task_sizes[t]:task_sizes[t + 1]].permute(0, 2, 1).reshape(-1, vb.shape[1])  # [(C K), D]
        cost = 1.0 - F.normalize(x, p=2, dim=1) @ F.normalize(basis, p=2, dim=1).T
        dists.append(authors_sinkhorn_distance(cost, eps))
    return torch.cat(dists), int(torch.argmax(torch.cat(dists)))


def authors_stats(x, y, lo, hi):
    "`Area.analyze_mean_cov`: mean and cov + 1e-4 I, one class at a time."
    out = []
    for c in range(lo, hi):
        d = x[y == c]
        out.append((d.mean(0), torch.cov(d.t()) + 1e-4 * torch.eye(d.shape[-1], dtype=d.dtype)))
    return out


# --- shared small inputs -----------------------------------------------------------------------------------------

D, K, C = 6, 3, 5


def blobs(n, classes, gen, norm=4.0, spread=0.5):
    centres = torch.randn(classes, D, generator=gen, dtype=DT)
    y = torch.arange(n) % classes
    return norm * l2norm(centres[y] + spread * torch.randn(n, D, generator=gen, dtype=DT)), y


def text_side(seed=5, M=4):
    g = make_generator(seed)
    return TextSide(l2norm(torch.randn(C, D, generator=g, dtype=DT)), l2norm(torch.randn(C, M, D, generator=g, dtype=DT)),
                    torch.ones(C, M, dtype=torch.bool), 2 + torch.rand(C, generator=g, dtype=DT))


def twin(state):
    "The authors' network holding our state's weights, task by task."
    net = AuthorsArea(D, K).to(DT)
    for _ in state.net.visual_s: net.append_S(D)
    net.visual_adapter.weight.data = state.net.visual_adapter.weight.detach().clone()
    net.textual_adapter.weight.data = state.net.textual_adapter.weight.detach().clone()
    for mine, theirs in ((state.net.visual_s, net.visual_S), (state.net.textual_s, net.textual_S)):
        for a, b in zip(mine, theirs): b.weight.data = a.weight.detach().clone()
    return net


# --- the bases ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [1.0, 4.0])  # unit embeddings, and raw ones (the cosine clipped)
def test_log_map_and_bases_equal_the_authors(norm):
    g = make_generator(0)
    x, _ = blobs(12, 1, g, norm=norm)
    mu = l2norm(x.mean(0))
    torch.testing.assert_close(log_map(x, mu), authors_log_map(x, mu[None]).squeeze(0), **EXACT)
    near = torch.cat([mu[None], x[:3]])  # a row at the base point: theta below 1e-4, scale 1
    torch.testing.assert_close(log_map(near, mu), authors_log_map(near, mu[None]).squeeze(0), **EXACT)
    torch.testing.assert_close(geodesic_basis(x, K), authors_basis(x, K), **EXACT)


# --- logits and a task's SGD steps -------------------------------------------------------------------------------

def _state_with_bases(knobs, tasks=2):
    st = new_area_state(text_side(), 20.0, 0, knobs)
    g = make_generator(1)
    st.vb = torch.randn(C, D, K, generator=g, dtype=DT)
    st.tb = torch.randn(C, D, K, generator=g, dtype=DT)
    for _ in range(tasks): st.net.add_task(K, make_generator(2))
    with torch.no_grad():  # the second task's scorers moved away from the first's
        for s in (st.net.visual_s[-1], st.net.textual_s[-1]): s.weight.add_(0.1 * torch.randn(s.weight.shape, generator=g, dtype=DT))
    return st


def test_logits_equal_the_authors_forward():
    st = _state_with_bases(AreaKnobs(K=K))
    net = twin(st)
    x, _ = blobs(7, 3, make_generator(3))
    for t in (0, 1):
        ours = area_scores(st.net, t, x, st.text, st.vb, st.tb, st.scale)
        theirs = net(x, st.text, st.vb, st.tb, t, st.scale)
        torch.testing.assert_close(ours, theirs, **EXACT)


def _authors_steps(st, net, x, y, knobs, gen, lo):
    "The authors' `train` loop on one batch an epoch: SGD over all parameters, MultiStepLR, replay of every old class."
    opt = torch.optim.SGD(net.parameters(), momentum=0.9, lr=knobs.lr, weight_decay=knobs.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(knobs.milestones), gamma=knobs.gamma)
    t = len(net.visual_S) - 1
    for _ in range(knobs.epochs):
        perm = torch.randperm(len(x), generator=gen)
        inputs, targets = x[perm], y[perm]
        z = torch.randn(lo, knobs.samples_per_class, D, generator=gen, dtype=torch.float32).to(DT)
        sg = torch.cat([z[i] @ torch.linalg.cholesky(st.cov[i]).t() + st.means[i] for i in range(lo)])
        sg_t = torch.cat([torch.ones(knobs.samples_per_class, dtype=torch.long) * i for i in range(lo)])
        out = net(inputs, st.text[:len(st.vb)], st.vb, st.tb, t, st.scale, memory_data=sg)
        loss = F.cross_entropy(out, torch.cat([targets, sg_t]))
        loss.backward(); opt.step(); opt.zero_grad()
        sched.step()


def test_two_sgd_steps_with_replay_equal_the_authors():
    "Task 2 of 2 (classes 2..4 new, 0..1 replayed): two epochs of one batch each, the lr stepped after the first."
    knobs = AreaKnobs(K=K, epochs=2, milestones=(1,), batch_size=64, samples_per_class=3, lr=0.05, weight_decay=0.05)
    st = _state_with_bases(knobs)
    g = make_generator(4)
    xo, yo = blobs(20, 2, g)
    st.means, chol = class_gaussians(xo, yo, 0, 2, 1e-4, "AREA")
    st.chol, st.cov = chol, [c for _, c in authors_stats(xo, yo, 0, 2)]
    for (m, cov), mine, L in zip(authors_stats(xo, yo, 0, 2), st.means, st.chol):
        torch.testing.assert_close(mine, m, **EXACT)
        torch.testing.assert_close(L @ L.T, cov, **EXACT)
    st.n_seen, st.sizes = 2, [2, 3]
    x, y = blobs(15, 3, g)
    y = y + 2
    net = twin(st)
    fit_area(st, x, y, make_generator(9, "cpu"))
    _authors_steps(st, net, x, y, knobs, make_generator(9, "cpu"), 2)
    pairs = [(st.net.visual_adapter, net.visual_adapter), (st.net.textual_adapter, net.textual_adapter),
             *zip(st.net.visual_s, net.visual_S), *zip(st.net.textual_s, net.textual_S)]
    for a, b in pairs: torch.testing.assert_close(a.weight, b.weight, **EXACT)
    fresh = _state_with_bases(knobs)
    assert not torch.allclose(st.net.visual_s[1].weight, fresh.net.visual_s[1].weight)  # it moved
    torch.testing.assert_close(st.net.visual_s[0].weight, fresh.net.visual_s[0].weight, rtol=0, atol=0)  # old: not


# --- routing and the routed logits -------------------------------------------------------------------------------

def test_routing_equals_the_authors_sinkhorn_and_routed_logits_their_eval():
    st = _state_with_bases(AreaKnobs(K=K))
    st.n_seen, st.sizes = 5, [2, 3]
    net = twin(st)
    x, _ = blobs(9, 3, make_generator(5))
    ours = route_values(x, st.vb, st.sizes, 0.1)
    logits = area_logits(st, x)
    routes = []
    for i in range(len(x)):  # `_eval_cnn`: one image at a time, routed, then `forward_inference`
        dists, t = authors_route(x[i:i + 1], st.vb, [0, 2, 5])
        torch.testing.assert_close(ours[i], dists, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(logits[i:i + 1], net(x[i:i + 1], st.text, st.vb, st.tb, t, st.scale).detach(), **EXACT)
        routes.append(t)
    assert set(routes) == {0, 1}, routes  # both tasks' scorers are exercised


# --- a wrong implementation fails these tolerances ---------------------------------------------------------------

def test_the_tolerances_catch_one_changed_constant():
    st = _state_with_bases(AreaKnobs(K=K))
    net = twin(st)
    x, _ = blobs(7, 3, make_generator(3))
    theirs = net(x, st.text, st.vb, st.tb, 1, st.scale)
    with pytest.raises(AssertionError):  # the normalisation's +1e-6 dropped
        z = net.visual_adapter(x)[:, None] + torch.einsum("cdk,bk->bcd", st.vb, net.visual_S[1](x))
        w = net.textual_adapter(st.text) + torch.einsum("cdk,ck->cd", st.tb, net.textual_S[1](st.text))
        torch.testing.assert_close(st.scale * torch.einsum("bcd,cd->bc", l2norm(z), l2norm(w)), theirs, **EXACT)
    with pytest.raises(AssertionError):  # the routing's epsilon 0.1 -> 0.11
        torch.testing.assert_close(route_values(x[:1], st.vb, [2, 3], 0.11)[0],
                                   authors_route(x[:1], st.vb, [0, 2, 5])[0], rtol=1e-12, atol=1e-10)
    knobs = AreaKnobs(K=K, epochs=2, milestones=(1,), samples_per_class=0, lr=0.05, weight_decay=0.05)
    a, b = _state_with_bases(knobs), _state_with_bases(knobs.replace(weight_decay=0.049))
    xs, ys = blobs(15, 3, make_generator(4))
    for s in (a, b): s.n_seen, s.sizes = 0, [2, 3]  # two tasks of bases, nothing to replay
    fit_area(a, xs, ys, make_generator(9, "cpu")); fit_area(b, xs, ys, make_generator(9, "cpu"))
    with pytest.raises(AssertionError):  # weight decay 0.05 -> 0.049
        torch.testing.assert_close(b.net.visual_s[1].weight, a.net.visual_s[1].weight, **EXACT)


# --- a task end to end, saving, bad input ------------------------------------------------------------------------

SMALL = AreaKnobs(K=K, epochs=3, milestones=(2,), batch_size=16)


def _two_tasks(knobs=SMALL, seed=0):
    x, y = blobs(60, 4, make_generator(6))
    st, gen = new_area_state(text_side(), 20.0, seed, knobs), make_generator(seed)
    read = lambda r, kind="unit": (x[torch.as_tensor(r)], y[torch.as_tensor(r)])
    for cls in ([0, 1], [2, 3]): train_area_task(st, read, np.flatnonzero(np.isin(y, cls)), cls, gen)
    return st, x, y, read


def test_two_tasks_and_a_round_trip_through_a_dict(tmp_path):
    st, x, y, _ = _two_tasks()
    assert (st.n_seen, st.sizes, st.vb.shape, st.tb.shape, st.chol.shape) == (4, [2, 2], (4, D, K), (4, D, K), (4, D, D))
    torch.testing.assert_close(area_logits(st, x), area_logits(_two_tasks()[0], x), rtol=0, atol=0)
    torch.save(area_state_dict(st), tmp_path / "s.pt")
    back = area_state_from_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    torch.testing.assert_close(area_logits(back, x), area_logits(st, x), rtol=0, atol=0)
    assert back.knobs == st.knobs and back.sizes == st.sizes
    with pytest.raises(SpaError, match="rerun without --resume"): area_state_from_dict({"version": 0})


def test_bad_input_fails_before_any_work():
    st, x, y, read = _two_tasks()
    for bad, msg in ((dict(embeddings="half"), "choose 'raw'"), (dict(K=0), "at least 1"), (dict(lr=0.0), "must be > 0")):
        with pytest.raises(SpaError, match=msg): AreaKnobs(**bad)
    with pytest.raises(SpaError, match="must continue right after the 4"):
        train_area_task(st, read, np.arange(3), [5], make_generator(0))
    fresh = new_area_state(text_side(), 20.0, 0, SMALL)
    with pytest.raises(SpaError, match="fewer than 2 training images"):
        train_area_task(fresh, read, np.flatnonzero(y == 0)[:1].tolist() + np.flatnonzero(y == 1).tolist(), [0, 1],
                        make_generator(0))
    with pytest.raises(SpaError, match="train a task first"): area_logits(fresh, x)


@pytest.mark.slow
def test_cli_runs_area_on_the_embedded_world(tmp_path):
    env = os.environ | dict(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                            OMP_NUM_THREADS="1")
    folder = tmp_path / "generated_descriptions"  # the embedded world's descriptions, as AREA's files
    folder.mkdir()
    for c, phrases in synthetic_world().descriptions.items():
        (folder / f"{c.replace(' ', '_')}_descriptions.txt").write_text(
            "".join(f"train_{i}.png\t{s}, as filed\n" for i, s in enumerate(phrases)))  # told apart from the world's
    p = subprocess.run([sys.executable, "-m", "spa_toolkit.cli", "run", "--methods", "area",
                        "--set", "area.epochs=2", "--descriptions", str(folder), "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "area" in p.stdout, p.stdout[-2000:]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["descriptions"] == str(folder) and run["descriptions_used_by"] == ["area"], run["descriptions"]
    read = json.loads((tmp_path / "out" / "class_descriptions.json").read_text())["descriptions"]
    assert all(s.endswith(", as filed") for phrases in read.values() for s in phrases)  # the folder's sentences
