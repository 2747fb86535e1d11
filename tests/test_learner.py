"The learner on devices: one place chooses the device, and asking for one that is not there fails cleanly."
import pytest
import torch

from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import SpaError
from spa_toolkit.learner import new_state, predict, train_task
from spa_toolkit.protocol import prepare, run_method, texts_needed
from spa_toolkit.world import synthetic_world
from spa_toolkit.microclip import load_embedded_clip


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    world = synthetic_world(n_classes=8, n_train=8, n_test=4, inc=4)
    return prepare(world, load_embedded_clip(), cache_dir=tmp_path_factory.mktemp("features"), progress=False, views=1,  # ENGINE's, at 1 epoch
                   texts=texts_needed(["engine"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_run_on_a_cpu_machine_fails_with_the_fix():
    with pytest.raises(SpaError, match="--device cpu"): load_embedded_clip(device="cuda")


def test_everything_follows_the_state_device(prep):
    state = train_task(new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(epochs=1)), prep.train, prep.splits[0])
    assert {p.device.type for p in state.proj.parameters()} == {"cpu"}
    assert state.stats.means.device.type == "cpu" and state.pstats.stats.means.device.type == "cpu"
    g = torch.zeros(2, prep.text.names.shape[1], device="meta")  # features on another device than the state
    with pytest.raises((RuntimeError, NotImplementedError, SpaError)): predict(state, g, None, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_state_gives_the_cpu_logits(prep):
    "The same trained state on CUDA scores the same features as on the CPU: logits allclose, not only curves."
    from spa_toolkit.learner import state_dict, state_from_dict
    from spa_toolkit.method import rows, task_rows
    state = train_task(new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(epochs=1)), prep.train, prep.splits[0])
    gpu = state_from_dict(state_dict(state), "cuda")
    r = rows(prep.test, task_rows(prep.test, 0, 4), "cpu")
    with torch.no_grad():
        cpu_logits, gpu_logits = predict(state, r.g, r.p), predict(gpu, r.g.cuda(), r.p.cuda())
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-3)


def test_progress_false_keeps_extraction_quiet(tmp_path, capsys):
    world = synthetic_world(n_classes=4, n_train=2, n_test=1, inc=4)
    prepare(world, load_embedded_clip(), cache_dir=tmp_path / "quiet", progress=False)
    assert "features" not in capsys.readouterr().err
    prepare(world, load_embedded_clip(), cache_dir=tmp_path / "loud", progress=True)
    assert "features synthetic-" in capsys.readouterr().err


def test_frozen_baselines_read_no_patch_tokens(prep):
    for scorer in ("zeroshot", "descriptions", "ncm"):
        state = train_task(new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(scorer=scorer, epochs=0)), prep.train, prep.splits[0])
        assert state.pstats is None, scorer


def test_a_bad_setting_fails_before_extraction(tmp_path):
    world = synthetic_world(n_classes=8, n_train=2, n_test=1, inc=4)
    with pytest.raises(SpaError, match="B0Inc3"): prepare(world, load_embedded_clip(), "B0Inc3", cache_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_every_method_runs_through_run_method(prep):
    "SPA, its ablations, the baselines and the peers all run in the same loop on the same prepared features."
    from spa_toolkit.base import list_methods
    from spa_toolkit.peers.proof import ProofKnobs
    from spa_toolkit.peers.rapf import RapfKnobs
    from spa_toolkit.peers.engine import EngineKnobs
    short = dict(proof=ProofKnobs(epochs=1), rapf=RapfKnobs(epochs=1), engine=EngineKnobs(epochs=1, views=0))
    for m in list_methods():
        r = run_method(prep, m, progress=False, knobs=short.get(m, SpaKnobs(epochs=1)))
        assert len(r.curve) == len(prep.splits) and 0 <= r.average <= 100, m


def _random_cache(n_classes: int, per_class: int, n_patches: int, d: int, seed: int):
    "Unit features and patch tokens of `n_classes` classes, as an in-memory FeatureSet, and a text side."
    import numpy as np
    from spa_toolkit.backbone import FeatureSet
    from spa_toolkit.core import l2norm, make_generator
    from spa_toolkit.method import TextSide
    g = make_generator(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    centres = l2norm(torch.randn(n_classes, d, generator=g))
    feats = l2norm(centres[y] + 0.5 * torch.randn(len(y), d, generator=g)).half().numpy()
    patches = l2norm(torch.randn(len(y), n_patches, d, generator=g)).half().numpy()
    sem = l2norm(torch.randn(n_classes, 3, d, generator=g))
    return FeatureSet(feats, patches, None, y.numpy(), None, {}), TextSide(centres, sem, torch.ones(n_classes, 3,
                                                                                                   dtype=torch.bool))


def test_the_running_relevance_gives_the_recomputed_predictions_at_every_task():
    "Evaluation with the memo kept between tasks predicts what recomputing every row's selection predicts."
    from spa_toolkit.learner import SPA
    from spa_toolkit.protocol import evaluate
    train, text = _random_cache(12, 6, 10, 16, seed=0)
    test, _ = _random_cache(12, 4, 10, 16, seed=1)
    state = new_state(text, 50.0, knobs=SpaKnobs(epochs=1, k_patches=3, class_chunk=2))
    for t in range(3):
        train_task(state, train, list(range(4 * t, 4 * t + 4)))
        kept = state.memo
        running, after = evaluate(SPA, state, test), state.memo
        assert after is kept or t == 0  # one memo, continued
        assert after.covered[:len(running[1])].tolist() == [state.n_seen] * len(running[1])
        state.memo = None
        fresh = evaluate(SPA, state, test)
        assert (running[0] == fresh[0]).all() and (running[1] == fresh[1]).all()
        state.memo = after  # the next evaluation continues the running memo


def test_a_memo_answers_for_its_own_cache_only():
    "Rows of another cache (same row numbers, other tokens) start a new memo: their sets are their own."
    from spa_toolkit.learner import eval_patch_sets
    from spa_toolkit.method import rows
    from spa_toolkit.patches import select_patch_sets
    a, text = _random_cache(4, 5, 10, 16, seed=0)
    b, _ = _random_cache(4, 5, 10, 16, seed=2)
    state = train_task(new_state(text, 50.0, knobs=SpaKnobs(epochs=1, k_patches=3)), a, [0, 1, 2, 3])
    idx = list(range(20))
    eval_patch_sets(state, rows(a, idx, "cpu"), 4)
    rb = rows(b, idx, "cpu")
    assert (eval_patch_sets(state, rb, 4) == select_patch_sets(rb.p.float(), text.sem[:4], 3, text.sem_mask[:4])).all()
    assert state.memo.feats is b


def test_evaluation_without_patch_tokens_names_the_fix_and_a_copied_state_drops_its_memo():
    "Rows of a cache without patches get predict's own message; a deep copy does not copy the cache the memo holds."
    import copy
    from spa_toolkit.learner import spa_logits
    from spa_toolkit.method import rows
    train, text = _random_cache(4, 5, 10, 16, seed=0)
    state = train_task(new_state(text, 50.0, knobs=SpaKnobs(epochs=1, k_patches=3)), train, [0, 1, 2, 3])
    score = spa_logits(state)
    with pytest.raises(SpaError, match="needs patch tokens"): score(rows(train, list(range(4)), "cpu", patches=False))
    score(rows(train, list(range(20)), "cpu"))
    assert state.memo is not None and copy.deepcopy(state).memo is None
