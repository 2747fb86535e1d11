"""PROOF and RAPF against hand-computed examples (their losses, memory, fusion, pairs, statistics), and they, RanPAC and
FeCAM in the protocol: deterministic given the seed, and a run resumed mid-way equals the uninterrupted one."""
import math

import numpy as np
import pytest
import torch

from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.method import load_state, rows, task_rows
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.peers.common import clip_loss
from spa_toolkit.peers.proof import ProofKnobs, ProofScores, cut_memory, herding_memory, proof_loss
from spa_toolkit.peers.rapf import RapfKnobs, fuse_adapters, gaussian_stats, hard_pairs, separation_loss
from spa_toolkit.peers.ranpac import RanpacKnobs
from spa_toolkit.peers.fecam import FecamKnobs
from spa_toolkit.protocol import Prepared, prepare, run_method
from spa_toolkit.world import synthetic_world


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    world = synthetic_world(n_classes=8, n_train=8, n_test=4, inc=4)
    return prepare(world, load_embedded_clip(), cache_dir=tmp_path_factory.mktemp("features"), progress=False)


# --- PROOF, by hand ---------------------------------------------------------------------------------------------

def test_proof_loss_by_hand():
    "Fused-text CE + fused-prototype CE + the contrastive term, 1:1:1, on two orthogonal images at tau = 1."
    eye = torch.eye(2)
    s = ProofScores(eye, eye, torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]]))
    ce_text = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2
    ce_proto = (math.log(1 + math.exp(2)) + math.log(2)) / 2  # row 0's positive is the lower one; row 1 ties
    want = ce_text + ce_proto + math.log(1 + math.exp(-1))
    assert proof_loss(s, torch.tensor([0, 1]), 1.0).item() == pytest.approx(want, rel=1e-6)
    assert clip_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_herding_memory_by_hand():
    "Herding picks, per class, the sample whose running mean stays nearest the class mean: here 45 deg, then 0 deg."
    ang = torch.deg2rad(torch.tensor([0.0, 90.0, 45.0, 10.0, 200.0]))
    g = torch.stack([ang.cos(), ang.sin()], 1)
    y = torch.tensor([0, 0, 0, 1, 1])
    rows_, labels = herding_memory(g, y, torch.tensor([10, 11, 12, 13, 14]), 2)
    assert rows_[:1].tolist() == [12] and labels.tolist() == [0, 0, 1, 1]
    kept, kept_y = cut_memory(rows_, labels, 1)
    assert kept.tolist() == [12, rows_[2].item()] and kept_y.tolist() == [0, 1]


def test_proof_memory_is_the_budget_split_over_seen_classes(prep, tmp_path):
    "After two tasks of 4 classes, a budget of 16 keeps 16 // 8 = 2 herding exemplars of every class, from its own rows."
    run_method(prep, "proof", out_dir=tmp_path, progress=False, knobs=ProofKnobs(epochs=1, memory_size=16))
    st = load_state(tmp_path / "proof.state.pt")[0]
    assert st.memory_labels.tolist() == [c for c in range(8) for _ in range(2)]
    assert (prep.train.labels[st.memory.numpy()] == st.memory_labels.numpy()).all()
    protos = torch.stack([rows(prep.train, task_rows(prep.train, c, c + 1), "cpu", patches=False).g.mean(0)
                          for c in range(8)])
    torch.testing.assert_close(st.protos, protos)


# --- RAPF, by hand ----------------------------------------------------------------------------------------------

def test_separation_loss_by_hand():
    f, pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]]), torch.tensor([[0.8, 0.6]])
    assert separation_loss(f, pos, neg, 0.1).item() == pytest.approx(0.8 - 0.6 + 0.1)
    assert separation_loss(f, neg, pos, 0.1).item() == 0  # already nearer its own class by more than the margin


def test_fuse_adapters_limits():
    "bias 1 keeps the new adapter whole; an unchanged adapter stays itself whatever the bias."
    g = make_generator(0)
    w_old, w_new = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    torch.testing.assert_close(fuse_adapters(w_old, w_new, 1.0), w_new, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fuse_adapters(w_old, w_old.clone(), 0.3), w_old, rtol=1e-5, atol=1e-5)
    mixed = fuse_adapters(w_old, w_new, 0.0)
    assert not torch.allclose(mixed, w_new) and not torch.allclose(mixed, w_old)


def test_hard_pairs_by_hand():
    names = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.96, 0.28], [-1.0, 0.0]])  # class 2 is 0.28 from class 0
    assert hard_pairs(names, 2, 4, 0.55).tolist() == [[0, 2]]
    assert hard_pairs(names, 2, 4, 0.1).tolist() == []


def test_gaussian_stats_factor_the_jittered_covariance():
    g = torch.randn(30, 3, generator=make_generator(1), dtype=torch.float64)
    y = torch.arange(30) % 2
    mu, L = gaussian_stats(g, y, range(2))
    for c in range(2):
        torch.testing.assert_close(mu[c], g[y == c].mean(0))
        torch.testing.assert_close(L[c] @ L[c].T, torch.cov(g[y == c].T) + 1e-4 * torch.eye(3, dtype=torch.float64))


# --- both in the protocol ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, knobs", [("proof", ProofKnobs(epochs=2)), ("rapf", RapfKnobs(epochs=2)),
                                         ("ranpac", RanpacKnobs(rp_dim=300)), ("fecam", FecamKnobs(alpha=1.0))])
def test_deterministic_and_resumed_mid_run(prep, tmp_path, name, knobs):
    a = run_method(prep, name, seed=3, progress=False, knobs=knobs)
    assert a.curve == run_method(prep, name, seed=3, progress=False, knobs=knobs).curve
    assert a.knobs == knobs.to_dict() and a.knobs["peer"] == name
    full = run_method(prep, name, seed=1, out_dir=tmp_path / "full", progress=False, knobs=knobs)
    half = Prepared(**(vars(prep) | dict(splits=prep.splits[:1])))
    run_method(half, name, seed=1, out_dir=tmp_path / "resumed", progress=False, knobs=knobs)
    (tmp_path / "resumed" / f"{name}.json").unlink()  # killed during the second task: a state, no result
    resumed = run_method(prep, name, seed=1, out_dir=tmp_path / "resumed", resume=True, progress=False, knobs=knobs)
    assert resumed.curve == full.curve and resumed.run_key == full.run_key
    s, t = (load_state(tmp_path / f / f"{name}.state.pt")[0] for f in ("full", "resumed"))
    r = rows(prep.test, task_rows(prep.test, 0, s.n_seen), "cpu", patches=False)
    from spa_toolkit.method import get_method
    torch.testing.assert_close(get_method(name).logits(s)(r), get_method(name).logits(t)(r), rtol=0, atol=0)
