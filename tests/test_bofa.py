"""BOFA against a plain re-expression of its authors' computation (LAMDA-CL/C3Box `models/bofa.py` `Learner`,
`utils/inc_net.py` `BofaAdapter`, `backbone/linears.py` `OLF`) on small random inputs, in float64: the statistics,
the mixing weight, both training stages over two tasks and the test scores; one SGD step by hand; bad inputs; the
saved state; and the command line on the embedded world. The reference is written the authors' way (per-class loops,
`torch.cov`, `torch.linalg.pinv`, einsum, a list of second moments stacked and averaged, `W_list`, the per-task linear
head with its `low_loss`, which our code leaves out), so a difference is ours."""
import io, math, os, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spa_toolkit.base import SpaError
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.method import Rows, TextSide, get_method, load_state, save_state
from spa_toolkit.peers.bofa import (BofaKnobs, bofa_logits, bofa_state_dict, bofa_state_from_dict, check_bofa,
                                    new_bofa_state, train_bofa_task)

DT = torch.float64


# --- the authors' computation, re-expressed -----------------------------------------------------------------------

class AuthorsBofa:
    "BofaAdapter + OLF + Learner.train/_eval_cnn over given pre-projection features (no backbone), as written there."

    def __init__(self, visual_proj, text, logit_scale_param, kt, tuned_epoch, stage2_epoch, bs, lr, wd, stat):
        self.visual_proj, self.text, self.logit_scale = visual_proj, text, logit_scale_param
        W0 = visual_proj.T.clone()  # OLF(W0_torch=W0.T) with BofaAdapter's W0 = visual.proj [w, d]
        d, w = W0.shape
        self.W0, self.W_task = W0.clone(), nn.Parameter(W0.clone())
        self.B, self.A = nn.Parameter(torch.zeros(d, kt, dtype=DT)), torch.zeros(w, kt, dtype=DT)
        self.W_fusion, self.cov_matrices, self.W_list, self.task_id = W0.clone(), [], [], 0
        self.mu = self.mu_norm = self.cov_inv = None
        self.classifier_list, self.t_lam, self.kt = [], 0, kt
        self.tuned_epoch, self.stage2_epoch, self.bs, self.lr, self.wd, self.stat = \
            tuned_epoch, stage2_epoch, bs, lr, wd, stat

    def update_stat(self, vecs, labels, known, total):
        mean = vecs.mean(0, keepdim=True)
        _ = vecs - mean  # computed, unused, in `update_old_features`
        self.cov_matrices.append(vecs.T @ vecs / (vecs.shape[0] - 1) + 1e-4 * torch.eye(vecs.shape[1], dtype=DT))
        vn = vecs / vecs.norm(dim=-1, keepdim=True)
        mu = torch.cat([vecs[labels == i].mean(0, keepdim=True) for i in range(known, total)])
        mu_norm = torch.cat([vn[labels == i].mean(0, keepdim=True) for i in range(known, total)])
        cvn = torch.cat([vn[labels == i] - mu_norm[i - known] for i in range(known, total)])
        cov_inv = cvn.shape[1] * torch.linalg.pinv(
            (cvn.shape[0] - 1) * cvn.T.cov() + cvn.T.cov().trace() * torch.eye(cvn.shape[1], dtype=DT))
        ps = torch.ones(mu_norm.shape[0], dtype=DT) / mu_norm.shape[0]
        self.current_W = torch.einsum("nd, dc -> cn", mu_norm, cov_inv)
        self.current_b = ps.log() - torch.einsum("nd, dc, nc -> n", mu_norm, cov_inv, mu_norm) / 2
        if self.mu is None:
            self.mu, self.mu_norm, self.cov_inv = mu, mu_norm, cov_inv
        else:
            a, b = known / total, (total - known) / total
            dm = self.mu_norm.T.mean(dim=1).unsqueeze(1) - mu_norm.T.mean(dim=1).unsqueeze(1)
            self.cov_inv = a * self.cov_inv + b * cov_inv + ((known / total) * (total - known) / total ** 2) * dm @ dm.T
            self.mu, self.mu_norm = torch.cat([self.mu, mu]), torch.cat([self.mu_norm, mu_norm])
        ps = torch.ones(self.mu_norm.shape[0], dtype=DT) / self.mu_norm.shape[0]
        self.W = torch.einsum("nd, dc -> cn", self.mu_norm, self.cov_inv)
        self.b = ps.log() - torch.einsum("nd, dc, nc -> n", self.mu_norm, self.cov_inv, self.mu_norm) / 2

    def search_lambda(self, feats, labels, image_proto, text_proto):
        image_proto = image_proto / image_proto.norm(dim=-1, keepdim=True)
        text_proto = text_proto / text_proto.norm(dim=-1, keepdim=True)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        best_acc, best_lam = -1.0, 0.0
        for lam in torch.linspace(0, 1, steps=21):
            acc = ((feats @ ((1 - lam) * image_proto + lam * text_proto).T).argmax(1) == labels).float().mean().item()
            if acc > best_acc: best_acc, best_lam = acc, lam.item()
        return best_lam

    def incremental_train(self, vecs, labels, known, total, gen, cur_task):
        self.update_stat(vecs, labels, known, total)
        text_proto = self.text[:total]
        if self.t_lam == 0:  # init_accuracy: OLF in eval mode, so W_fusion
            self.t_lam = self.search_lambda(F.linear(vecs, self.W_fusion), labels, self.mu @ self.visual_proj,
                                            text_proto)
        head = nn.Linear(vecs.shape[1], total - known).double()  # update_task
        head.weight.data, head.bias.data = self.current_W.T.clone(), self.current_b.clone()
        self.classifier_list.append(head)
        groups = [{"params": [self.W_task]}, {"params": [self.B], "lr": 0.001, "weight_decay": 0.001},
                  {"params": head.parameters(), "lr": 0.001, "weight_decay": 0.001}]
        opt = torch.optim.SGD(groups, momentum=0.9, lr=self.lr, weight_decay=self.wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.tuned_epoch, eta_min=0)
        img_proto = self.mu @ self.visual_proj
        cls_proto = self.t_lam * (img_proto / img_proto.norm(dim=-1, keepdim=True)) + \
            (1 - self.t_lam) * text_proto / text_proto.norm(dim=-1, keepdim=True)
        for epoch in range(self.tuned_epoch + self.stage2_epoch):
            if epoch == self.tuned_epoch and cur_task > 0:  # prepare_for_stage2
                avg_cov = torch.mean(torch.stack(self.cov_matrices[:-1], dim=0), dim=0)
                self.A.data = torch.linalg.eigh(avg_cov)[1][:, :self.kt].clone()
                with torch.no_grad(): self.B.data = (self.W_task.data - self.W0) @ self.A
            for idx in torch.randperm(len(vecs), generator=gen).split(self.bs):
                x, t = vecs[idx], labels[idx]
                vn = x / x.norm(dim=-1, keepdim=True)
                low_logits = head(vn)
                if epoch >= self.tuned_epoch and cur_task > 0: feats = F.linear(x, self.W0 + self.B @ self.A.T)
                else: feats = F.linear(x, self.W_task)
                loss = F.cross_entropy(self.logit_scale * (feats / feats.norm(dim=-1, keepdim=True)) @ cls_proto.t(), t)
                if epoch < 6: loss = F.cross_entropy(low_logits, t - known) + loss
                opt.zero_grad(); loss.backward(); opt.step()
            sched.step()
        self.W_list.append(self.W_task.data.clone() if self.task_id == 0 else self.W0 + (self.B @ self.A.T).detach())
        self.W_fusion = sum(self.W_list) / len(self.W_list)
        self.task_id += 1

    def eval_logits(self, vecs, text_eval):
        img = self.mu @ self.visual_proj
        cls_proto = self.t_lam * (img / img.norm(dim=-1, keepdim=True)) + \
            (1 - self.t_lam) * (text_eval / text_eval.norm(dim=-1, keepdim=True))
        f = F.linear(vecs, self.W_fusion)
        out_update = (f / f.norm(dim=-1, keepdim=True)) @ cls_proto.T
        vn = vecs / vecs.norm(dim=-1, keepdim=True)
        return self.stat * (vn @ self.W + self.b) + (1 - self.stat) * out_update


# --- a small world of random features -------------------------------------------------------------------------------

W_, D_, PER = 10, 5, 15  # pre-projection width, joint width, images per class (a task's 45 > W_: full-rank moments)


def world(seed=0):
    g = make_generator(seed)
    y = torch.arange(6).repeat_interleave(PER)
    pre = torch.randn(len(y), W_, generator=g, dtype=DT) + 2.5 * torch.randn(6, W_, generator=g, dtype=DT)[y]
    proj = torch.randn(W_, D_, generator=g, dtype=DT) / 3
    names = l2norm(torch.randn(6, D_, generator=g, dtype=DT) + (2.5 * torch.randn(6, W_, generator=g, dtype=DT)) @ proj)
    return pre, y, proj, names


def read_of(pre, y):
    def read(r, kind="unit"):
        assert kind == "pre"
        return pre[torch.as_tensor(r)], y[torch.as_tensor(r)]
    return read


KNOBS = BofaKnobs(epochs=3, stage2_epochs=2, batch_size=16, rank=4)


def run_ours(pre, y, proj, names, knobs=KNOBS, seed=5, scale=30.0):
    st, gen = new_bofa_state(names, proj, scale, knobs), make_generator(seed)
    for cls in ([0, 1, 2], [3, 4, 5]):
        train_bofa_task(st, read_of(pre, y), np.flatnonzero(np.isin(y, cls)), cls, gen)
    return st


@pytest.mark.parametrize("seed", [0, 1])
def test_two_tasks_equal_the_authors(seed):
    "Statistics, mixing weight, both stages (stage 2 through the old tasks' low-energy basis) and the test scores."
    pre, y, proj, names = world(seed)
    st = run_ours(pre, y, proj, names)
    ref, gen = AuthorsBofa(proj, names, math.log(30.0), 4, 3, 2, 16, 0.05, 0.05, 0.1), make_generator(5)
    for t, cls in enumerate(([0, 1, 2], [3, 4, 5])):
        rows = torch.from_numpy(np.flatnonzero(np.isin(y, cls)))
        ref.incremental_train(pre[rows], y[rows], cls[0], cls[-1] + 1, gen, t)
    assert st.lam == ref.t_lam
    torch.testing.assert_close(st.prec, ref.cov_inv, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(st.bridge, ref.W_fusion, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st.w_task, ref.W_task.data, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bofa_logits(st, pre), ref.eval_logits(pre, names), rtol=1e-9, atol=1e-10)
    assert (st.bridge - proj.T).abs().max() > 1e-3  # the bridge did move: the comparison is not of two W0
    assert (bofa_logits(st, pre).argmax(1) == y).float().mean() > 0.5


def test_one_step_of_each_stage_by_hand():
    """One batch per epoch, one epoch per stage: the cosine is at its floor 0 in the second epoch, so the first
    task is one SGD step W1 = W0 - lr (grad + wd W0), and the second task's weight is W0 + (W2 - W0) A A^T."""
    pre, y, proj, names = world(3)
    k = BofaKnobs(epochs=1, stage2_epochs=1, batch_size=10 ** 6, rank=4, lr=0.5, weight_decay=0.01)
    st, gen, s = new_bofa_state(names, proj, 30.0, k), make_generator(0), math.log(30.0)
    w0 = proj.T.clone()
    first = np.flatnonzero(y < 3)
    train_bofa_task(st, read_of(pre, y), first, [0, 1, 2], gen)

    def step(w, x, t, protos):
        w = w.clone().requires_grad_(True)
        f = x @ w.T
        F.cross_entropy(s * (f / f.norm(dim=-1, keepdim=True)) @ protos.T, t).backward()
        return (w - 0.5 * (w.grad + 0.01 * w)).detach()

    def protos(n):
        img = st.mu[:n] @ proj
        return st.lam * img / img.norm(dim=-1, keepdim=True) + (1 - st.lam) * names[:n]

    w1 = step(w0, pre[first], y[first], protos(3))
    torch.testing.assert_close(st.fusion_sum, w1, rtol=1e-12, atol=1e-14)
    second = np.flatnonzero(y >= 3)
    train_bofa_task(st, read_of(pre, y), second, [3, 4, 5], gen)
    w2 = step(w1, pre[second], y[second], protos(6))
    old = pre[first]
    A = torch.linalg.eigh(old.T @ old / (len(old) - 1) + 1e-4 * torch.eye(W_, dtype=DT))[1][:, :4]
    torch.testing.assert_close(st.w_task, w2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st.fusion_sum - w1, w0 + (w2 - w0) @ A @ A.T, rtol=1e-10, atol=1e-12)


# --- bad input, the saved state, the interface ---------------------------------------------------------------------

def test_bad_input_is_refused_before_any_work():
    pre, y, proj, names = world()
    with pytest.raises(SpaError, match="not a ViT tower|no ViT tower"): new_bofa_state(names, proj[:0], 30.0)
    with pytest.raises(SpaError, match="lower rank"): new_bofa_state(names, proj, 30.0, BofaKnobs(rank=11))
    with pytest.raises(SpaError, match="lower rank"): new_bofa_state(names[:, :3], proj, 30.0, KNOBS)
    for bad, needle in [(dict(stage2_epochs=0), "use at least 1"), (dict(stat=-0.1), r"\[0, 1\]"),
                        (dict(lr=0.0), "must be > 0"), (dict(rank=1.5), "pass int")]:
        with pytest.raises(SpaError, match=needle): BofaKnobs(**bad)
    st = new_bofa_state(names, proj, 30.0, KNOBS)
    with pytest.raises(SpaError, match="train a task first"): bofa_logits(st, pre)
    with pytest.raises(SpaError, match="class\\(es\\) empty"):
        train_bofa_task(st, read_of(pre, y), np.flatnonzero(y < 2), [0, 1, 2], make_generator(0))
    with pytest.raises(SpaError, match="must continue right after"):
        train_bofa_task(st, read_of(pre, y), np.flatnonzero(y == 3), [3], make_generator(0))
    with pytest.raises(SpaError, match="visual.proj takes"):
        train_bofa_task(st, read_of(pre[:, :8], y), np.flatnonzero(y < 3), [0, 1, 2], make_generator(0))
    assert st.n_seen == 0 and st.mu.shape == (0, W_)  # nothing was half-learned


def test_state_round_trips_through_save_and_the_interface(tmp_path):
    pre, y, proj, names = world()
    st = run_ours(pre, y, proj, names)
    buf = io.BytesIO(); torch.save(bofa_state_dict(st), buf); buf.seek(0)
    back = bofa_state_from_dict(torch.load(buf, weights_only=True))
    assert (back.lam, back.n_seen, back.n_tasks, back.knobs) == (st.lam, st.n_seen, st.n_tasks, st.knobs)
    assert torch.equal(bofa_logits(back, pre), bofa_logits(st, pre))
    loaded, extra = load_state(save_state(st, tmp_path / "bofa.pt", note=1))
    assert extra == {"note": 1} and torch.equal(bofa_logits(loaded, pre), bofa_logits(st, pre))
    m = get_method("bofa")
    rows = Rows(l2norm(pre @ proj), None, y, None, pre)
    assert torch.equal(m.logits(st)(rows), bofa_logits(st, pre))
    text = TextSide(names, names[:, None], torch.ones(6, 1, dtype=torch.bool), None, proj)
    assert torch.equal(m.new(text, 30.0, 0, KNOBS).w_task, proj.T)
    with pytest.raises(SpaError, match="rerun without --resume"): bofa_state_from_dict(dict(version=0))


def test_check_refuses_a_cache_without_pre_projection_features():
    from types import SimpleNamespace as NS
    _, _, proj, _ = world()
    prep = lambda pre, p: NS(train=NS(pre=pre), test=NS(pre=pre), text=NS(visual_proj=p))
    with pytest.raises(SpaError, match="not a ViT tower"): check_bofa(prep(None, proj), KNOBS)
    with pytest.raises(SpaError, match="not a ViT tower"): check_bofa(prep(np.zeros((2, W_)), proj[:0]), KNOBS)
    with pytest.raises(SpaError, match="lower bofa.rank"): check_bofa(prep(np.zeros((2, 7)), proj), KNOBS)
    check_bofa(prep(np.zeros((2, W_)), proj), KNOBS)


@pytest.mark.slow
def test_cli_runs_bofa_on_the_embedded_world(tmp_path):
    "The command line's default run with `--methods bofa`: well above chance (1/24), and resumable."
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "SPA_DATA_ROOT")} | dict(
        LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "spa_toolkit.cli", "run", "--methods", "bofa",
                                     "--out", str(tmp_path / "out"), *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=600)
    p = run()
    assert p.returncode == 0, p.stderr[-2000:]
    row = next(l for l in p.stdout.splitlines() if l.startswith("| bofa | synthetic"))
    avg, last = (float(v) for v in row.strip("|").split("|")[4:6])
    assert last > 3 * 100 / 24 and avg > last
    again = run("--resume")
    assert again.returncode == 0 and row in again.stdout, again.stderr[-2000:]
