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


# --- PROOF: one training step and its logits on raw inputs, float64, against the authors' computation -------------

@pytest.fixture
def float64():
    "Layers, prompts and draws in float64 for the test (the toolkit's layers take the default dtype)."
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def world4(seed=0, n=8):
    "Four classes of `n` unit features each, raw norms 10-20 (CLIP's range), raw class names of norms 8-12."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(4 * n) // n
    unit = l2norm(torch.randn(4 * n, D, generator=g) + 2 * torch.eye(D)[y])
    norm = 10 + 10 * torch.rand(4 * n, generator=g)
    names = l2norm(torch.randn(4, D, generator=g) + 2 * torch.eye(D)[:4]) * (8 + 4 * torch.rand(4, 1, generator=g))
    return unit, norm, y, names


def authors_proof(P, x, names, protos, n, scale, train=True):
    """utils/inc_net.py `Proof_Net`: `encode_image` / `encode_text` sum every task's projection of the raw embedding
    (`models/proof.py::_train_proj` normalises both after; `_eval_cnn` normalises the text only and feeds the image's
    sum unnormalised to `forward_transformer` and to the first score: `train=False`), `encode_prototpyes` takes the
    prototypes through the image projections; `forward_transformer` runs [image; texts; prototypes; context prompts]
    through one-head `MultiHeadAttention` (w_qs, w_ks, w_vs without bias, temperature sqrt(d), fc, residual,
    layer_norm). Returns the projected image and texts and the fused text and prototype logits [B, n]."""
    unit = lambda v: v / v.norm(dim=-1, keepdim=True)
    img = sum(x @ w.T + b for w, b in P["img"])
    img = unit(img) if train else img
    txt = unit(sum(names[:n] @ w.T + b for w, b in P["txt"]))
    pro = unit(sum(protos[:n] @ w.T + b for w, b in P["img"]))
    B = len(x)
    seq = torch.cat([img[:, None], *(t.expand(B, -1, -1) for t in (txt, pro, torch.cat(P["prompts"])))], 1)
    attn = torch.softmax(torch.bmm(seq @ P["wq"].T, (seq @ P["wk"].T).transpose(1, 2)) / D ** 0.5, dim=2)
    out = F.layer_norm(torch.bmm(attn, seq @ P["wv"].T) @ P["fc"][0].T + P["fc"][1] + seq, (D,), *P["ln"])
    fused_text = torch.bmm(out[:, :1], out[:, 1:n + 1].transpose(1, 2))[:, 0]
    fused_proto = torch.bmm(out[:, :1], out[:, n + 1:2 * n + 1].transpose(1, 2))[:, 0]
    return img, txt, fused_text, fused_proto


def authors_loss(P, x, y, names, protos, n, scale):
    "`_train_proj`: CE(fused text) + CE(fused prototypes) + open_clip's `ClipLoss` of image b and its class text."
    img, txt, ft, fp = authors_proof(P, x, names, protos, n, scale)
    li, diag = scale * img @ txt[y].T, torch.arange(len(x))
    return F.cross_entropy(ft, y) + F.cross_entropy(fp, y) + (F.cross_entropy(li, diag) + F.cross_entropy(li.T, diag)) / 2


def params_of(net):
    "The network's tensors in the authors' roles (every task's projections and prompts, the attention)."
    f = net.fusion
    return dict(img=[(l.weight, l.bias) for l in net.img], txt=[(l.weight, l.bias) for l in net.txt],
                prompts=list(net.prompts), wq=f.q.weight, wk=f.k.weight, wv=f.v.weight,
                fc=(f.out.weight, f.out.bias), ln=(f.norm.weight, f.norm.bias))


def flat(P):
    "Every tensor of `params_of`, flattened into one vector."
    leaves = lambda v: [u for t in (v if isinstance(v, list) else [v]) for u in (t if isinstance(t, tuple) else [t])]
    return torch.cat([t.detach().flatten() for v in P.values() for t in leaves(v)])


def test_proof_training_step_and_logits_on_raw_inputs(float64):
    """One SGD step of the second task (its images and the first task's memory, one batch) and the logits after it,
    against the authors' computation on the raw embeddings, to float64 precision; fed unit embeddings or a 1% larger
    lr, the authors' computation lands outside that tolerance."""
    import copy
    unit, norm, y, names = world4()
    raw = unit * norm[:, None]
    read = lambda r, kind="unit": ((raw if kind == "raw" else unit)[torch.as_tensor(r)], y[torch.as_tensor(r)])
    k = ProofKnobs(epochs=1, batch_size=64, memory_size=8, dropout=0.0)
    st = new_proof_state(names, 100.0, 0, k)
    first, second = np.arange(16), np.arange(16, 32)
    train_proof_task(st, read, first, [0, 1], make_generator(1))
    memory = st.memory.clone()
    before = copy.deepcopy(st.net)
    before.add_task(k.prompt_len, make_generator(2))  # the same draws as train_proof_task's first ones
    train_proof_task(st, read, second, [2, 3], make_generator(2))

    protos = torch.stack([unit[y == c].mean(0) for c in range(4)])  # `cal_prototype`: means of normalised features
    rows = np.concatenate([second, np.sort(memory.numpy())])
    def authors_step(feed, lr):
        P = params_of(copy.deepcopy(before))
        trains = [*P["img"][-1], *(t for wb in P["txt"] for t in wb), P["prompts"][-1], P["wq"], P["wk"], P["wv"],
                  *P["fc"], *P["ln"]]  # `freeze_projection_weight_new`, `update_context_prompt`: what trains
        opt = torch.optim.SGD(trains, lr=lr, momentum=0.9, weight_decay=0.05)
        x = feed[rows]
        authors_loss(P, x, y[rows], names if feed is raw else l2norm(names), protos, 4, 100.0).backward()
        opt.step()
        return P
    P = authors_step(raw, k.lr)
    ours = params_of(st.net)
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(ours), flat(P), **tol)
    assert (flat(ours) - flat(params_of(before))).abs().max() > 1e-5  # the step moved the parameters
    for wrong in (authors_step(unit, k.lr), authors_step(raw, 1.01 * k.lr)):
        assert not torch.allclose(flat(ours), flat(wrong), **tol)

    # inference (`_eval_cnn`): unnormalised projected image . projected text + fused text + fused prototype logits,
    # the fusion fed the unnormalised image; neither the normalised image (training's reading) nor unit inputs match
    with torch.no_grad():
        img, txt, ft, fp = authors_proof(P, raw, names, protos, 4, 100.0, train=False)
        assert img.norm(dim=-1).min() > 2  # raw-scale images at inference
        torch.testing.assert_close(proof_logits(st, raw), img @ txt.T + ft + fp, **tol)
        for wrong in (authors_proof(P, raw, names, protos, 4, 100.0),
                      authors_proof(P, unit, l2norm(names), protos, 4, 100.0, train=False)):
            img, txt, ft, fp = wrong
            assert not torch.allclose(proof_logits(st, raw), img @ txt.T + ft + fp, **tol)


def test_engine_training_step_on_raw_inputs(float64):
    """One SGD step of ENGINE's second task (its images, a noisy prototype of each old class around its *raw* mean,
    descriptions, cached views) against models/engine.py's computation on the raw embeddings, to float64 precision;
    unit inputs, the noise around unit means, or a 1% larger lr fall outside that tolerance."""
    import copy, math
    unit, norm, y, names = world4()
    raw = unit * norm[:, None]
    pre = torch.randn(len(y), W, generator=torch.Generator().manual_seed(3)) + torch.eye(W)[y]
    read = lambda r, kind="unit": (dict(unit=unit, raw=raw, pre=pre)[kind][torch.as_tensor(r)], y[torch.as_tensor(r)])
    views = l2norm(unit + 0.3 * torch.randn(unit.shape, generator=torch.Generator().manual_seed(4)))  # unit, as cached
    read_views = lambda r, v: views[torch.as_tensor(r)]
    desc = l2norm(torch.randn(4, 1, D, generator=torch.Generator().manual_seed(5)))  # one per class: no draw matters
    k = EngineKnobs(epochs=1, batch_size=64, views=1)
    st = new_engine_state(names, desc, torch.ones(4, 1, dtype=torch.bool), 100.0, 0, k)
    first, second = np.arange(16), np.arange(16, 32)
    train_engine_task(st, read, first, [0, 1], make_generator(1), read_views)
    before, gen = copy.deepcopy(st.net), make_generator(2)
    before.add_task(D, gen)  # train_engine_task's first draws: the new adapter pair
    torch.randperm(16, generator=gen)  # then the batch order (the loss does not depend on it)
    eps = torch.randn(2, D, generator=gen)  # then one noise vector per old class
    train_engine_task(st, read, second, [2, 3], make_generator(2), read_views)

    def authors_step(feed, lr, means):
        A, B = copy.deepcopy(before.img), copy.deepcopy(before.txt)
        opt = torch.optim.SGD([*A[-1].parameters(), *B[-1].parameters()], lr=lr, momentum=0.9, weight_decay=0.05)
        x = torch.cat([feed[second], means + 0.25 * eps])  # the batch, then `sample_noise` around each old mean
        labels = torch.cat([y[second], torch.arange(2)])
        unitv = lambda v: v / v.norm(dim=-1, keepdim=True)
        z = unitv(sum(a(x) for a in A))
        u = unitv(sum(b(names if feed is raw else l2norm(names)) for b in B))[labels]
        s, diag = math.log(100.0), torch.arange(len(x))  # ClipLoss at the logit_scale parameter, ln(tau)
        clip = (F.cross_entropy(s * z @ u.T, diag) + F.cross_entropy(s * u @ z.T, diag)) / 2
        loss = clip + 2.0 * F.cross_entropy(u @ desc[labels, 0].T, diag) + \
               0.5 * F.cross_entropy(z[:16] @ views[second].T, torch.arange(16))
        loss.backward(); opt.step()
        return torch.cat([p.detach().flatten() for p in [*A.parameters(), *B.parameters()]])

    ours = torch.cat([p.detach().flatten() for p in [*st.net.img.parameters(), *st.net.txt.parameters()]])
    raw_means = torch.stack([raw[y == c].mean(0) for c in (0, 1)])
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, authors_step(raw, k.lr, raw_means), **tol)
    unit_means = torch.stack([unit[y == c].mean(0) for c in (0, 1)])
    for wrong in (authors_step(unit, k.lr, unit_means), authors_step(raw, k.lr, unit_means),
                  authors_step(raw, 1.01 * k.lr, raw_means)):
        assert not torch.allclose(ours, wrong, **tol)


def test_engine_clean_view_stand_in_is_the_unit_feature():
    """models/engine.py normalises `aug_image_features` before the view term, so the cached views are unit; with
    views=0 the clean stand-in must be the unit feature too, not the raw embedding the adapters read."""
    unit, norm, pre, y, names = world()
    read = reader(unit, norm, pre, y)
    sem, mask = l2norm(torch.randn(2, 3, D, generator=make_generator(1))), torch.ones(2, 3, dtype=torch.bool)

    def trained(views, read_views=None):
        st = new_engine_state(names * 10, sem, mask, 100.0, 0, EngineKnobs(epochs=2, batch_size=8, views=views))
        train_engine_task(st, read, np.arange(N), [0, 1], make_generator(0), read_views)
        return torch.cat([p.detach().flatten() for p in st.net.parameters()])

    raw = unit * norm[:, None]
    clean = trained(0)
    torch.testing.assert_close(clean, trained(1, lambda r, v: l2norm(raw)[torch.as_tensor(r)]), rtol=0, atol=0)
    far = trained(1, lambda r, v: raw[torch.as_tensor(r)])  # views at the raw scale train otherwise
    assert not torch.allclose(clean, far, rtol=1e-3, atol=1e-5)
