"""PROOF, RAPF and ENGINE on inputs at CLIP-like raw norms, against the authors' computation re-expressed here (their
files named per test): what each reads raw, what it reads normalised, and one training step on raw features."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.method import Rows, get_method
from spa_toolkit.peers.engine import EngineKnobs, new_engine_state, train_engine_task
from spa_toolkit.peers.proof import ProofKnobs, new_proof_state, proof_logits, proof_scores, train_proof_task
from spa_toolkit.peers.rapf import RapfKnobs, new_rapf_state, rapf_logits, shrink_cov, train_rapf_task

D, W, N = 8, 12, 24  # projected width, pre-projection width, images (2 classes x 12)


def world(seed=0):
    "Unit features with raw norms in CLIP's range (10-20), their pre-projection features, labels, unit class names."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) // (N // 2)
    unit = l2norm(torch.randn(N, D, generator=g) + 2 * torch.eye(D)[y])
    norm = 10 + 10 * torch.rand(N, generator=g)
    pre = torch.randn(N, W, generator=g) * 3 + torch.eye(W)[y]
    names = l2norm(torch.randn(2, D, generator=g) + 2 * torch.eye(D)[:2])
    return unit, norm, pre, y, names


def reader(unit, norm, pre, y):
    "A `Task.read`: (rows, kind) -> (features of that kind, labels)."
    kinds = dict(unit=unit, raw=unit * norm[:, None], pre=pre)
    return lambda r, kind="unit": (kinds[kind][torch.as_tensor(r)], y[torch.as_tensor(r)])


def test_rapf_one_step_and_statistics_on_raw_features():
    "continual_clip/models.py: `forward` adapts the raw encode_image output then normalises; `analyze_mean_cov`."
    unit, norm, pre, y, names = world()
    raw = unit * norm[:, None]
    st = new_rapf_state(names, 100.0, 0, RapfKnobs(epochs=1, batch_size=N, shrinkage=True))
    a = st.adapter.weight.detach().clone().requires_grad_()
    train_rapf_task(st, reader(unit, norm, pre, y), np.arange(N), [0, 1], make_generator(0))
    # the authors' step: Adam on the cross-entropy of tau * unit(A x_raw) . unit(w_c), one batch of the whole task
    opt = torch.optim.Adam([a], lr=RapfKnobs().lr)
    F.cross_entropy(100.0 * l2norm(raw @ a.T) @ names.T, y).backward(); opt.step()
    torch.testing.assert_close(st.adapter.weight.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    # their statistics of the raw features: mean, torch.cov + 1e-4 I, shrunk where `shrinkage` (in `sample`)
    for c in (0, 1):
        x = raw[y == c]
        torch.testing.assert_close(st.means[c], x.mean(0))
        cov = shrink_cov(torch.cov(x.T) + 1e-4 * torch.eye(D))
        torch.testing.assert_close(st.chols[c] @ st.chols[c].T, cov, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rapf_logits(st, raw), 100.0 * l2norm(raw @ a.detach().T) @ names.T)
    assert st.means.norm(dim=1).min() > 5  # raw-scale statistics, not unit ones


def test_rapf_reads_what_its_knob_says():
    unit, norm, pre, y, names = world()
    fits = {}
    for kind in ("raw", "unit"):
        st = new_rapf_state(names, 100.0, 0, RapfKnobs(epochs=1, batch_size=N, embeddings=kind))
        fits[kind] = train_rapf_task(st, reader(unit, norm, pre, y), np.arange(N), [0, 1], make_generator(0))
    torch.testing.assert_close(fits["unit"].means[0], unit[y == 0].mean(0))
    # A has no bias and its output is normalised: the step is blind to each input's scale; only the statistics (the
    # 1e-4 jitter's size against them, hence the replayed features) see the raw reading
    torch.testing.assert_close(fits["raw"].adapter.weight, fits["unit"].adapter.weight, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fits["raw"].means, fits["unit"].means)
    r = Rows(unit, None, y, norm)
    torch.testing.assert_close(get_method("rapf").logits(fits["raw"])(r), rapf_logits(fits["raw"], unit * norm[:, None]))


def test_proof_projects_raw_features_and_keeps_normalised_prototypes():
    """utils/inc_net.py `Proof_Net.encode_image`: the projection bank on the raw image embedding, normalised after;
    models/proof.py `cal_prototype`: class means of the normalised embeddings."""
    unit, norm, pre, y, names = world()
    raw, raw_names = unit * norm[:, None], names * torch.tensor([9.0, 11.0])[:, None]
    st = new_proof_state(raw_names, 100.0, 0, ProofKnobs(epochs=1, batch_size=8, memory_size=8))
    train_proof_task(st, reader(unit, norm, pre, y), np.arange(N), [0, 1], make_generator(0))
    torch.testing.assert_close(st.protos, torch.stack([unit[y == c].mean(0) for c in (0, 1)]))
    proj = lambda x, bank: l2norm(sum(x @ f.weight.T + f.bias for f in bank))
    s = proof_scores(st, raw, 2)
    torch.testing.assert_close(s.z, proj(raw, st.net.img))
    torch.testing.assert_close(s.t, proj(raw_names, st.net.txt))
    assert not torch.allclose(s.z, proj(unit, st.net.img))  # the biases make the input's scale count
    torch.testing.assert_close(get_method("proof").logits(st)(Rows(unit, None, y, norm)), proof_logits(st, raw))


def test_engine_prototypes_raw_and_discriminant_on_normalised_pre_projection_features():
    """models/engine.py: class means of the raw embeddings (the noisy prototypes' centres); the Gaussian
    discriminant's means over the normalised features before `visual.proj`."""
    unit, norm, pre, y, names = world()
    raw = unit * norm[:, None]
    sem, mask = l2norm(torch.randn(2, 3, D, generator=make_generator(1))), torch.ones(2, 3, dtype=torch.bool)
    st = new_engine_state(names * 10, sem, mask, 100.0, 0, EngineKnobs(epochs=1, batch_size=8, views=0))
    train_engine_task(st, reader(unit, norm, pre, y), np.arange(N), [0, 1], make_generator(0))
    torch.testing.assert_close(st.means, torch.stack([raw[y == c].mean(0) for c in (0, 1)]))
    torch.testing.assert_close(st.gda_means.to(torch.float32),
                               torch.stack([l2norm(pre)[y == c].mean(0) for c in (0, 1)]).to(torch.float32))
    assert st.prec.shape == (W, W)
    with pytest.raises(Exception, match="pre-projection"):
        get_method("engine").logits(st)(Rows(unit, None, y, norm))  # no pre-projection features read
    logits = get_method("engine").logits(st)(Rows(unit, None, y, norm, pre))
    assert logits.shape == (N, 2) and (logits.argmax(1) == y).float().mean() > 0.8
