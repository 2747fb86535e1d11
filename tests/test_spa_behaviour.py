"SPA's learner does what its knobs say: frozen old adapters, replay over every old class, k patches, capped descriptions, consistent replay."
import numpy as np
import pytest
import torch

import spa_toolkit.learner as L
import spa_toolkit.method as M
import spa_toolkit.protocol as P
from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.world import synthetic_world
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.patches import capped


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    world = synthetic_world(n_classes=12, n_train=10, n_test=8, inc=4)
    return P.prepare(world, load_embedded_clip(), cache_dir=tmp_path_factory.mktemp("features"), progress=False)


def trained(prep, tasks=2, **knobs):
    state = L.new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(**(dict(epochs=2, lr=0.05) | knobs)))
    for classes in prep.splits[:tasks]: L.train_task(state, prep.train, classes, make_generator(0))
    return state


def test_old_adapters_stay_frozen_and_unchanged(prep):
    state = trained(prep, tasks=1)
    before = {k: v.clone() for k, v in state.proj.state_dict().items()}
    L.train_task(state, prep.train, prep.splits[1], make_generator(1))
    after = state.proj.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a trained task's adapters changed in a later task"
    assert not any(p.requires_grad for bank in (state.proj.visual, state.proj.text) for p in bank.adapters[0].parameters())
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if ".1." in k)  # the new adapter trained


def test_replay_schedule_covers_every_old_class_each_epoch():
    old = torch.arange(7)
    batches = L.replay_schedule(old, n_batches=3, per_batch=5, generator=make_generator(0))
    assert [len(b) for b in batches] == [5, 5, 5]
    labels = torch.cat(batches)
    assert set(labels[:7].tolist()) == set(range(7))  # a full round before any class comes twice
    assert torch.bincount(labels, minlength=7).min() >= 2 and torch.bincount(labels).max() <= 3


def test_training_replays_pseudo_features_of_every_old_class(prep, monkeypatch):
    seen = []
    real = L.draw_pseudo
    def spy(stats, layout, gen, **kw):
        seen.append(layout.labels.unique().tolist())  # the classes the step's draw keeps
        return real(stats, layout, gen, **kw)
    monkeypatch.setattr(L, "draw_pseudo", spy)
    trained(prep, tasks=2, epochs=1)
    assert seen, "no pseudo-features were drawn while training the second task"
    assert set().union(*map(set, seen)) == set(prep.splits[0])
    seen.clear()
    trained(prep, tasks=2, epochs=1, pseudo_ratio=0.01)  # fewer pseudo-features than old classes asked: the epoch still covers them all
    assert set().union(*map(set, seen)) == set(prep.splits[0])
    seen.clear()
    trained(prep, tasks=2, epochs=1, calibration=False)
    assert not seen


def test_k_patches_is_the_number_of_patches_scored(prep):
    "With k = 1 and mean pooling the patch score is the mean similarity of the single most relevant patch."
    state = L.new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(k_patches=1, pool="mean"))
    r = M.rows(prep.test, np.arange(6), state.device)
    p, sem, mask = r.p.float(), prep.text.sem[:4], prep.text.sem_mask[:4]
    rel = torch.einsum("bnd,cmd->bncm", p, sem).masked_fill(~mask[None, None], -torch.inf).amax(-1).amax(-1)  # [B, N] to any class
    best = l2norm(p[torch.arange(6), rel.argmax(1)])  # identity projectors: the frozen token
    want = (torch.einsum("bd,cmd->bcm", best, sem) * mask / mask.sum(1, keepdim=True)).sum(-1)
    with torch.no_grad(): got = L._patch_scores(state, r.p, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(): assert not torch.allclose(L._patch_scores(L.new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(k_patches=8, pool="mean")), r.p, 4), got)


def test_each_patch_knob_changes_the_scores(prep):
    r = M.rows(prep.test, np.arange(6), "cpu")
    base = trained(prep, tasks=1)
    with torch.no_grad(): ref = L.predict(base, r.g, r.p, 4)
    for knob in [dict(selection="class"), dict(pool="mean"), dict(pool="max"), dict(pool="ot"), dict(eps_relative=False), dict(proto=0.0), dict(lam=0.0)]:
        state = trained(prep, tasks=1, **knob)
        with torch.no_grad(): assert not torch.allclose(L.predict(state, r.g, r.p, 4), ref), knob


def test_descriptions_are_capped_and_the_cap_is_in_the_run_key(prep):
    world = prep.benchmark
    many = {c: [f"phrase {i}" for i in range(40)] for c in world.class_names}
    clip = load_embedded_clip()
    p4 = P.prepare(world, clip, descriptions=many, cache_dir=prep.train.folder.parent, n_desc=4, progress=False)
    p8 = P.prepare(world, clip, descriptions=many, cache_dir=prep.train.folder.parent, n_desc=8, progress=False)
    assert p4.text.sem.shape[1] == 4 and p8.text.sem.shape[1] == 8
    assert capped(many[world.class_names[0]], 4, world.class_names[0]) != many[world.class_names[0]][:4]  # a sample, not a prefix
    knobs = M.method_knobs("spa", SpaKnobs(n_desc=4))
    assert P.run_key(p4, knobs, 0) != P.run_key(p8, M.method_knobs("spa", SpaKnobs(n_desc=8)), 0)
    with pytest.raises(M.SpaError, match="texts="): P.run_key(p8, knobs, 0)  # p8 holds no side capped at 4: no key
    proof = M.method_knobs("proof")  # no n_desc knob of its own: the cap reaches its key through the text side alone
    assert P.run_key(p4, proof, 0) != P.run_key(p8, proof, 0)
    with pytest.raises(M.SpaError, match="prepare"): P.run_method(p4, "spa", progress=False)  # knobs say 8, the text side holds 4


def test_evaluation_scores_classes_a_chunk_at_a_time(prep, monkeypatch):
    "Memory at evaluation is bounded by class_chunk classes, whatever the number of classes."
    widths = []
    real = L.pooled_score
    monkeypatch.setattr(L, "pooled_score", lambda S, *a, **k: widths.append(S.shape[1]) or real(S, *a, **k))
    state = trained(prep, tasks=3, class_chunk=5, epochs=1)
    widths.clear()
    P.evaluate(L.SPA, state, prep.test)  # 96 test images: one chunk of images
    assert widths == [5, 5, 2]  # 12 classes, 5 at a time


def margin_gap(state, prep):
    real, pseudo = L.replay_margins(state, prep.test, prep.splits[0], 200, make_generator(3))
    return abs(real.mean() - pseudo.mean()).item() / real.std().item()


def test_replay_is_consistent_with_the_test(prep):
    "Old classes' pseudo-features meet the classifier as their real test images do: mean margins within 0.5 std of the real ones."
    state = trained(prep, tasks=2)
    assert margin_gap(state, prep) <= 0.5
    # the check sees a replay that does not match: patch statistics of the wrong classes
    st = state.pstats.stats
    order = torch.cat([torch.arange(4, 8), torch.arange(4)]).repeat_interleave(state.pstats.slots) * state.pstats.slots
    order = order + torch.arange(state.pstats.slots).repeat(8)
    state.pstats.stats = type(st)(st.classes, st.means[order], st.counts, st.cov, st.factor[order], st.shrink)
    assert margin_gap(state, prep) > 0.5


def test_padded_descriptions_change_nothing(prep):
    "A class's patch score does not depend on how many padding slots its semantic tokens carry."
    state = L.new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(proto=0.0))
    pad = lambda t, v: torch.cat([t, torch.full((t.shape[0], 3, *t.shape[2:]), v, dtype=t.dtype)], 1)
    padded = L.new_state(M.TextSide(prep.text.names, pad(prep.text.sem, 0.0), pad(prep.text.sem_mask, False)), prep.logit_scale, knobs=SpaKnobs(proto=0.0))
    r = M.rows(prep.test, np.arange(6), "cpu")
    for pool in ("semi_ot", "ot", "mean", "max"):
        state.knobs = padded.knobs = state.knobs.replace(pool=pool)
        with torch.no_grad(): torch.testing.assert_close(L._patch_scores(padded, r.p, 8), L._patch_scores(state, r.p, 8), rtol=1e-5, atol=1e-6)
