"ENGINE as a peer: its losses and scores against hand-computed examples, shapes, determinism, resume mid-run, and the CLI flow."
import json, math, os, re, subprocess, sys

import numpy as np
import pytest
import torch

from spa_toolkit.core import SpaError, l2norm, make_generator
from spa_toolkit.base import SpaKnobs
from spa_toolkit.world import synthetic_world
from spa_toolkit.peers.engine import (diagonal_ce, engine_cos, EngineKnobs, engine_logits, engine_loss, gda_scores, gda_stats, merge_gda,
                                new_engine_state, noisy_prototypes, rerank_scores, sample_descriptions, train_engine_task)
import dataclasses
import spa_toolkit.peers.engine as E
from spa_toolkit.method import TextSide, encode_text_side, get_method, load_state, rows, task_rows
from spa_toolkit.protocol import Prepared, prepare, run_method, run_protocol, text_side, texts_needed
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.peers.common import project


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    world = synthetic_world(n_classes=8, n_train=8, n_test=4, inc=4)
    return prepare(world, load_embedded_clip(), cache_dir=tmp_path_factory.mktemp("features"), progress=False, views=2,
                   texts=texts_needed(["engine"]))  # its views and its own phrasing


# --- losses, by hand ------------------------------------------------------------------------------------------------

def test_diagonal_ce_by_hand():
    s = torch.tensor([[0.6, 0.0], [0.8, 1.0]])
    want = (math.log(1 + math.exp(-0.6)) + math.log(1 + math.exp(-0.2))) / 2  # row 0: e^.6 / (e^.6 + 1); row 1: e^1 / (e^.8 + e^1)
    assert diagonal_ce(s).item() == pytest.approx(want, rel=1e-6)


def test_engine_loss_by_hand():
    "Each term on a 2-row batch whose second row is a noisy prototype (no view): s = ln 100 on the contrastive term."
    e = torch.eye(2)
    desc = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    s = math.log(100.0)
    clip = math.log(1 + math.exp(-s))  # logits s*I both ways: each row pays log(1 + e^-s)
    des = (math.log(1 + math.exp(-0.6)) + math.log(1 + math.exp(-0.2))) / 2  # U D^T = [[.6, 0], [.8, 1]]
    view = 0.0  # one real row: a softmax over one column
    got = engine_loss(e, e, desc, e[:1], s, text_des=2.0, image_aug=0.5)
    assert got.item() == pytest.approx(clip + 2 * des + 0.5 * view, rel=1e-6)
    # two real rows whose views are swapped: the view term pays log(1 + e) per row
    got = engine_loss(e, e, desc, e.flip(0), s, text_des=2.0, image_aug=0.5)
    assert got.item() == pytest.approx(clip + 2 * des + 0.5 * math.log(1 + math.e), rel=1e-6)


def test_gda_against_numpy_and_by_hand():
    "P_task = d * pinv(S + tr(S)/(N-1) I), S the pooled within-class scatter, checked with numpy's covariance on random data."
    gen = torch.Generator().manual_seed(0)
    g, y = torch.randn(30, 5, generator=gen, dtype=torch.float64), torch.arange(30) % 3
    mu, P = gda_stats(g, y, range(3))
    x = np.concatenate([g[y == c].numpy() - g[y == c].numpy().mean(0) for c in range(3)])
    cov = np.cov(x.T)  # x has zero mean overall, so (N - 1) cov is the scatter
    want = 5 * np.linalg.pinv(29 * cov + np.trace(cov) * np.eye(5))
    np.testing.assert_allclose(P.numpy(), want, rtol=1e-8)
    np.testing.assert_allclose(mu.numpy(), np.stack([g[y == c].numpy().mean(0) for c in range(3)]))
    # merge: k = 3 old, t = 5 seen; the between-means term weighs k (t - k) / t^3
    mu2, P2 = torch.zeros(2, 5, dtype=torch.float64), torch.eye(5, dtype=torch.float64)
    m, Pm = merge_gda(mu, P, mu2, P2)
    delta = mu.mean(0)[:, None]
    torch.testing.assert_close(Pm, 3 / 5 * P + 2 / 5 * P2 + 6 / 125 * delta @ delta.T)
    assert m.shape == (5, 5) and torch.equal(m[:3], mu)
    # scores by hand with P = I: <g, mu_c> - |mu_c|^2 / 2 - ln C, then the vector normalised
    mus = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    raw = torch.tensor([1.0 - 0.5, 0.0 - 2.0]) - math.log(2)
    torch.testing.assert_close(gda_scores(torch.tensor([[1.0, 0.0]]), mus, torch.eye(2)), (raw / raw.norm())[None])


def test_rerank_by_hand():
    "Only each image's top-K candidates of the adapted cosine get <g, e_c>; the rest 0."
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    g = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    cos = torch.tensor([[0.1, 0.3, 0.2], [0.9, 0.0, 0.5]])
    want = torch.tensor([[0.0, 0.6, 0.96], [0.0, 0.0, 0.8]])
    torch.testing.assert_close(rerank_scores(g, cos, centres, top=2), want)


def test_description_draws_skip_padding_and_follow_the_generator():
    sem = torch.arange(12, dtype=torch.float).reshape(2, 6, 1)
    mask = torch.tensor([[True, False, True, False, False, False], [False] * 5 + [True]])
    y = torch.tensor([0] * 300 + [1] * 10)
    d = sample_descriptions(sem, mask, y, make_generator(0))[:, 0]
    assert set(d[:300].tolist()) == {0.0, 2.0} and set(d[300:].tolist()) == {11.0}
    assert torch.equal(d, sample_descriptions(sem, mask, y, make_generator(0))[:, 0])
    assert not torch.equal(d, sample_descriptions(sem, mask, y, make_generator(1))[:, 0])


def test_noisy_prototypes_are_the_means_plus_noise():
    means = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x, y = noisy_prototypes(means, 0.0, make_generator(0))
    assert torch.equal(x, means) and y.tolist() == [0, 1]
    x, _ = noisy_prototypes(means.repeat(1, 5000), 0.25, make_generator(0))
    assert (x - means.repeat(1, 5000)).std().item() == pytest.approx(0.25, rel=0.03)


# --- the peer on random features ------------------------------------------------------------------------------------

def small_world(seed=0, d=6, n_classes=4, per_class=12):
    gen = make_generator(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    g = l2norm(torch.randn(len(y), d, generator=gen) + 2 * torch.eye(d)[y])
    names = l2norm(torch.eye(d)[:n_classes] + 0.2 * torch.randn(n_classes, d, generator=gen))
    sem = l2norm(names[:, None] + 0.3 * torch.randn(n_classes, 3, d, generator=gen))
    return g, y, names, sem, torch.ones(n_classes, 3, dtype=torch.bool)


UNIT = dict(embeddings="unit", discriminant="global")  # the hand-built tests: unit global features alone (the old reading)


def run_two_tasks(seed=0, read_views=None, **knobs):
    "Two tasks of two classes; the views default to two fixed noisy copies of each feature."
    g, y, names, sem, mask = small_world()
    views = l2norm(g[:, None] + 0.5 * torch.randn(len(g), 2, g.shape[1], generator=make_generator(9)))
    read_views = read_views or (lambda r, v: views[torch.as_tensor(r), v])
    st, gen = new_engine_state(names, sem, mask, 100.0, knobs=EngineKnobs(**(dict(epochs=3, batch_size=8, views=2) | UNIT | knobs))), make_generator(seed)
    read = lambda r: (g[torch.as_tensor(r)], y[torch.as_tensor(r)])
    for cls in ([0, 1], [2, 3]): train_engine_task(st, read, np.flatnonzero((y >= cls[0]) & (y <= cls[-1])), cls, gen, read_views)
    return st, g, y


def test_shapes():
    st, g, y = run_two_tasks()
    assert (st.n_seen, st.n_tasks, len(st.net.img), len(st.net.txt)) == (4, 2, 2, 2)
    assert st.means.shape == (4, 6) and st.prec.shape == (6, 6)
    assert engine_logits(st, g).shape == (len(g), 4) and engine_cos(st, g, 3).shape == (len(g), 3)
    assert engine_logits(st, g[:5]).shape == (5, 4)


def test_same_seed_same_logits_other_seed_other_logits():
    a, g, _ = run_two_tasks(0)
    b, _, _ = run_two_tasks(0)
    c, _, _ = run_two_tasks(1)
    assert torch.equal(engine_logits(a, g), engine_logits(b, g))
    assert not torch.equal(engine_logits(a, g), engine_logits(c, g))


def test_training_lowers_the_loss_and_freezes_old_adapters():
    g, y, names, sem, mask = small_world()
    read = lambda r: (g[torch.as_tensor(r)], y[torch.as_tensor(r)])
    first = np.flatnonzero(y < 2)
    def loss(s):  # the first task's objective, each row with its class's first description, viewed as its clean feature (views=0)
        z, u = project(s.net.img, g[first]), project(s.net.txt, names)[y[first]]
        return engine_loss(z, u, sem[y[first], 0], g[first], math.log(100.0)).item()
    drawn = new_engine_state(names, sem, mask, 100.0, knobs=EngineKnobs(epochs=0, **UNIT))
    train_engine_task(drawn, read, first, [0, 1], make_generator(0))  # the adapters as initialised
    trained, gen = new_engine_state(names, sem, mask, 100.0, knobs=EngineKnobs(epochs=5, batch_size=8, views=0, **UNIT)), make_generator(0)
    train_engine_task(trained, read, first, [0, 1], gen)  # the same initial adapters (the generator's first draws)
    assert loss(trained) < loss(drawn) - 0.1
    old = [p.detach().clone() for p in trained.net.parameters()]
    train_engine_task(trained, read, np.flatnonzero(y >= 2), [2, 3], gen)
    kept = [p for m in (trained.net.img[0], trained.net.txt[0]) for p in m.parameters()]
    assert len(kept) == len(old) == 4 and all(torch.equal(a, b) for a, b in zip(old, kept))


def test_epoch_e_reads_view_e_mod_v_of_the_task_rows():
    g, y, *_ = small_world()
    calls = []
    def read_views(r, v): calls.append((r.tolist(), v)); return g[torch.as_tensor(r)]
    run_two_tasks(read_views=read_views, epochs=5, views=2)
    first, second = np.flatnonzero(y < 2).tolist(), np.flatnonzero(y >= 2).tolist()
    assert calls == [(first, v) for v in (0, 1, 0, 1, 0)] + [(second, v) for v in (0, 1, 0, 1, 0)]


def test_the_views_are_the_view_terms_targets():
    "Views equal to the clean features train exactly as views=0 (the clean-feature stand-in); noisy views train otherwise."
    g, *_ = small_world()
    clean, _, _ = run_two_tasks(views=0)
    same, _, _ = run_two_tasks(read_views=lambda r, v: g[torch.as_tensor(r)])
    noisy, _, _ = run_two_tasks()
    assert torch.equal(engine_logits(clean, g), engine_logits(same, g))
    assert not torch.equal(engine_logits(clean, g), engine_logits(noisy, g))
    off, _, _ = run_two_tasks(read_views=lambda r, v: 1 / 0, views=2, image_aug=0.0)  # no view loss: no view read
    assert off.n_tasks == 2


def test_missing_views_are_refused_before_any_work():
    g, y, names, sem, mask = small_world()
    st = new_engine_state(names, sem, mask, 100.0, knobs=EngineKnobs(views=2, **UNIT))
    read = lambda r: 1 / 0  # never reached
    with pytest.raises(SpaError, match=r"reads 2 cached noisy views per image: pass read_views"):
        train_engine_task(st, read, np.arange(10), [0, 1], make_generator(0))
    assert st.n_seen == 0 and len(st.net.img) == 0


def test_inference_mixes_the_three_scores():
    st, g, _ = run_two_tasks()
    cos = engine_cos(st, g, 4)
    rr = rerank_scores(g, cos, l2norm(st.sem.sum(1)), 5)
    gda = gda_scores(g, st.gda_means, st.prec)
    torch.testing.assert_close(engine_logits(st, g), 0.8 * gda + 0.2 * (0.5 * rr + 0.5 * cos))


def test_a_class_without_descriptions_is_refused():
    _, _, names, sem, mask = small_world()
    mask[2] = False
    with pytest.raises(SpaError, match=r"classes \[2\] have none"): new_engine_state(names, sem, mask, 100.0)


# --- in the learner's loop ------------------------------------------------------------------------------------------

def test_the_peer_reads_the_text_side(prep):
    st = get_method("engine").new(prep.text, prep.logit_scale, 0, EngineKnobs())
    assert st.sem is prep.text.sem and st.sem_mask is prep.text.sem_mask
    torch.testing.assert_close(st.names, prep.text.raw_names, rtol=0, atol=0)  # the authors': raw name embeddings
    assert not torch.allclose(st.names.norm(dim=1), torch.ones(len(st.names)))
    unit = get_method("engine").new(prep.text, prep.logit_scale, 0, EngineKnobs(embeddings="unit"))
    assert unit.names is prep.text.names


def test_the_protocol_gives_it_the_authors_phrasing(prep, tmp_path):
    "ENGINE's descriptions are encoded as '{class} with {description}'; SPA's, in the same run, as the description alone."
    world, clip = synthetic_world(n_classes=8, n_train=8, n_test=4, inc=4), load_embedded_clip()
    want = encode_text_side(clip, world.class_names, world.templates, world.descriptions, "{c} with {s}", SpaKnobs().n_desc)
    (side, key), (spa_side, _) = text_side(prep, EngineKnobs()), text_side(prep, SpaKnobs())
    torch.testing.assert_close(side.sem, want.sem, rtol=0, atol=0)
    assert spa_side is prep.text and not torch.allclose(spa_side.sem, side.sem) and key != prep.text_key
    res = run_protocol(world, clip, ["spa", "engine"], cache_dir=tmp_path, progress=False, knobs=SpaKnobs(epochs=1))
    assert res["engine"].knobs["sem_template"] == "{c} with {s}" and len(res["engine"].curve) == 2
    for template, sem in (("{c} with {s}", want.sem), ("{s}", prep.text.sem)):  # its own side, or the run's
        run_method(prep, "engine", out_dir=tmp_path / template, progress=False,
                   knobs=EngineKnobs(epochs=1, sem_template=template))
        torch.testing.assert_close(load_state(tmp_path / template / "engine.state.pt")[0].sem, sem, rtol=0, atol=0)


def test_the_loop_refuses_engine_without_its_views(prep):
    with pytest.raises(SpaError, match=r"engine reads 10 noisy views per training image, the prepared benchmark caches 2: "
                                       r"prepare\(\.\.\., views=10\)"):
        run_method(prep, "engine", progress=False)  # the published 10 epochs, one view each
    bare = Prepared(**(vars(prep) | dict(train_views=None, n_views=0)))
    with pytest.raises(SpaError, match=r"caches 0: prepare\(\.\.\., views=2\)"): run_method(bare, "engine", progress=False, knobs=EngineKnobs(epochs=2))


def test_the_loop_hands_engine_the_views_of_the_task_rows(prep, monkeypatch):
    "The views reader gives view v of each training row: row i * V + v of the view cache, as the cached noisy view of image i."
    seen = []
    train = E.ENGINE.train
    def spy(state, task, gen):
        seen.append((task.rows.copy(), task.read_views(task.rows, 1)))
        return train(state, task, gen)
    monkeypatch.setattr(E, "ENGINE", dataclasses.replace(E.ENGINE, train=spy))
    run_method(prep, "engine", progress=False, knobs=EngineKnobs(epochs=1))
    r, v1 = seen[0]
    want = torch.from_numpy(prep.train_views.global_[r * 2 + 1].astype(np.float32))
    assert torch.equal(v1, want) and (prep.train_views.labels[r * 2 + 1] == prep.train.labels[r]).all()
    assert not torch.equal(v1, rows(prep.train, r, "cpu", patches=False).g)  # a noisy view, not the clean feature


def test_run_method_is_deterministic(prep):
    a = run_method(prep, "engine", seed=3, progress=False, knobs=EngineKnobs(epochs=2))
    b = run_method(prep, "engine", seed=3, progress=False, knobs=EngineKnobs(epochs=2))
    assert a.curve == b.curve and a.knobs["peer"] == "engine" and a.knobs["epochs"] == 2 and len(a.curve) == len(prep.splits)


def test_resume_mid_run_gives_the_uninterrupted_result(prep, tmp_path):
    full = run_method(prep, "engine", seed=1, out_dir=tmp_path / "full", progress=False, knobs=EngineKnobs(epochs=2))
    half = Prepared(**(vars(prep) | dict(splits=prep.splits[:1])))
    run_method(half, "engine", seed=1, out_dir=tmp_path / "resumed", progress=False, knobs=EngineKnobs(epochs=2))
    assert load_state(tmp_path / "resumed" / "engine.state.pt")[0].n_tasks == 1  # stopped after the first task
    resumed = run_method(prep, "engine", seed=1, out_dir=tmp_path / "resumed", resume=True, progress=False, knobs=EngineKnobs(epochs=2))
    assert resumed.curve == full.curve and resumed.run_key == full.run_key
    a, b = (load_state(tmp_path / f / "engine.state.pt")[0] for f in ("full", "resumed"))
    r = rows(prep.test, task_rows(prep.test, 0, a.n_seen), "cpu", patches=False, pre=True)
    assert torch.equal(get_method("engine").logits(a)(r), get_method("engine").logits(b)(r))
    assert torch.equal(a.prec, b.prec) and torch.equal(a.means, b.means)


@pytest.mark.slow
def test_engine_runs_in_the_default_cli_flow(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "SPA_DATA_ROOT")} | dict(
        LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run([sys.executable, "-m", "spa_toolkit.cli", "run", "--methods", "engine"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    row = re.search(r"^\| engine \| synthetic \| B0Inc4 \| 6 \| ([\d.]+) \| ([\d.]+) \|", p.stdout, re.M)
    assert row and 0 < float(row[1]) <= 100, p.stdout
    out = tmp_path / re.search(r"results written to (\S+)", p.stdout)[1]
    saved = json.loads((out / "engine.json").read_text())
    assert saved["knobs"]["peer"] == "engine" and saved["knobs"]["epochs"] == 10  # the published epochs, not SPA's
