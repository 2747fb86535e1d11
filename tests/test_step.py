"""SPA's training step: the same results as the plain step it replaces, and an operation count that does not grow with the tasks.

The plain step (`plain_fit` below, the learner's step before issue 29) runs every adapter of both banks on every row of every
step, builds the class side once for the real rows and once for the pseudo rows, and scores the two in separate passes. The
learner's step computes the frozen adapters' part of the task's rows once per task, stacks the frozen adapters into two batched
matmuls for the pseudo rows, builds the class side once a step and scores real and pseudo rows in one pass. Its forward values
are the same bits (BLAS computes each row of a matrix product alike whatever the number of rows, for more than one row); its
gradients are not: one matrix product over real and pseudo rows together, and one class side whose gradient sums both terms
before the adapter's backward, add the same terms in another order (and the stacked frozen adapters may take other BLAS
kernels), so the weights after a step differ in their last bits and training carries that on. Pinned: weights within 1e-6
and logits / logit_scale within 1e-6 (measured: 4e-7 and 1.4e-7 at most; float32 rounding of values of order 1 is 6e-8).
The operation count is counted as benchmarks/bench_ops.py counts it (a `TorchDispatchMode`), not timed.
"""
import importlib.util, math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import spa_toolkit.learner as L
import spa_toolkit.protocol as P
from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import make_generator
from spa_toolkit.method import rows, task_rows
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.world import synthetic_world

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    world = synthetic_world(n_classes=12, n_train=40, n_test=4, inc=4)  # 160 images a task: 2 batches of 64 and one of 32
    return P.prepare(world, load_embedded_clip(), cache_dir=tmp_path_factory.mktemp("features"), progress=False)


def plain_fit(state, data, n_seen, old, gen, progress):
    "The step as first written: every adapter on every row, the class side twice, real and pseudo rows in two passes."
    k = state.knobs
    params = state.proj.add_task(gen).freeze_old()
    n, bs = len(data.y), k.batch_size
    n_batches = math.ceil(n / bs)
    opt, sched = L._optimizer(params, k, k.epochs * n_batches)
    replay = k.calibration and len(old) > 0 and k.pseudo_ratio > 0
    ce = lambda g, p, y: F.cross_entropy(L.predict(state, g, p, n_seen, check=False), y)
    for _ in range(k.epochs):
        per_batch = L.pseudo_per_batch(len(old), n_batches, k)
        pseudo = (L._replay_counts(L.replay_schedule(old, n_batches, per_batch, gen), len(old)) if replay
                  else [None] * n_batches)
        for b, replayed in zip(torch.randperm(n, generator=gen, device=gen.device).split(bs), pseudo):
            loss = ce(data.g[b], None if data.p is None else data.p[b], data.y[b])
            if replayed is not None: loss = loss + k.pseudo_ratio * ce(*L._pseudo_batch(state, *replayed, gen))
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()


def run(prep, knobs: dict):
    "Trained weights and the logits of the test images of the seen classes after each task."
    state = L.new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(**(dict(epochs=2) | knobs)))
    logits = []
    for t, classes in enumerate(prep.splits):
        L.train_task(state, prep.train, classes, make_generator(t))
        r = rows(prep.test, task_rows(prep.test, 0, state.n_seen), "cpu", patches=state.knobs.uses_patches)
        with torch.no_grad(): logits.append(L.spa_logits(state)(r))
    return state.proj.state_dict(), logits


VARIANTS = [{}, dict(selection="class"), dict(lam=0.0), dict(pool="ot"), dict(calibration=False),
            dict(optimizer="adamw", proto=0.0), dict(lr=0.05, epochs=5)]


@pytest.mark.parametrize("knobs", VARIANTS, ids=str)
def test_the_step_gives_the_plain_steps_results(prep, monkeypatch, knobs):
    weights, logits = run(prep, knobs)
    with monkeypatch.context() as m:
        m.setattr(L, "_fit", plain_fit)
        plain_weights, plain_logits = run(prep, knobs)
    assert weights.keys() == plain_weights.keys()
    for key, w in weights.items(): torch.testing.assert_close(w, plain_weights[key], rtol=0, atol=1e-6, msg=key)
    scale = prep.logit_scale  # logits are scores of order 1 times CLIP's temperature
    for a, b in zip(logits, plain_logits): torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-6)
    assert any(not torch.equal(w, torch.zeros_like(w)) for key, w in weights.items() if ".2." in key)  # the last task trained


def bench_ops():
    spec = importlib.util.spec_from_file_location("bench_ops", ROOT / "benchmarks" / "bench_ops.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_the_steps_operations_do_not_grow_with_the_tasks():
    "Operations dispatched per step at task 10 of a CIFAR-like run (10 classes a task, 10 adapters) <= 1.2x those at task 2."
    B = bench_ops()
    counts = B.main(tasks=10, per_class=4, n_patches=8, d=32, quiet=True)  # 40 images a task: one short batch a step
    assert set(counts) == {2, 10}
    assert counts[10] <= 1.2 * counts[2], counts
    # 301 here (one short batch a task); 290 at bench_ops.py's CIFAR-like default, where the target <= 300 is
    # measured; the plain step: ~1,080 at d = 512, growing by ~30 per task
    assert counts[10] <= 305, counts



# a task's 160 rows in batches of 60: the last 40 padded to 60 by repeating 20 of them, so a step that ignored the weights
# (a plain mean over the padded batch) would count those 20 twice and train other weights
UNEVEN = dict(batch_size=60)


def assert_same_training(a, b, scale):
    """Weights within 1e-5 relative + 1e-8 (they are of order 1e-4: an absolute 1e-6 would be loose), logits / scale
    within 1e-5. Measured, compiled against eager: 5.6e-10 beyond the relative part and 5e-7; a step that ignores the
    weights: 8.3e-5 and 5.2e-4."""
    (wa, la), (wb, lb) = a, b
    assert wa.keys() == wb.keys()
    for key, w in wa.items(): torch.testing.assert_close(wb[key], w, rtol=1e-5, atol=1e-8, msg=key)
    for x, y in zip(la, lb): torch.testing.assert_close(y / scale, x / scale, rtol=0, atol=1e-5)


def test_a_padded_step_gives_the_steps_results(prep, monkeypatch):
    "compile_step pads the short last batch and weights its rows: the same training to float32 rounding."
    eager = run(prep, UNEVEN)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the padded step, eager
    assert_same_training(eager, run(prep, UNEVEN | dict(compile_step=True)), prep.logit_scale)


def test_a_padded_batch_weighs_its_rows_as_a_mean():
    "Every row of the epoch once with weight 1/b (b: its batch's real rows), padding at weight 0, one size for all."
    for n, bs in [(10, 4), (3, 8), (64, 64), (65, 64), (160, 60)]:
        batches = L.epoch_batches(torch.randperm(n), bs, fixed=True, like=torch.zeros(0, dtype=torch.float64))
        assert {len(b) for b, _ in batches} == {min(n, bs)}
        assert torch.equal(torch.cat([b[w > 0] for b, w in batches]).sort().values, torch.arange(n))
        for b, w in batches:
            assert w.dtype == torch.float64 and torch.equal(w[w > 0], torch.full_like(w[w > 0], 1 / int((w > 0).sum())))


@pytest.mark.slow
def test_the_compiled_step_gives_the_steps_results(prep):
    "torch.compile (inductor on the CPU) once a task, under a recompile limit below the tasks: the eager step's results."
    from torch._dynamo.utils import counters
    eager = run(prep, UNEVEN)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1):  # each task compiles its own copy: no limit is reached
        compiled = run(prep, UNEVEN | dict(compile_step=True))
    assert counters["stats"]["unique_graphs"] - graphs >= len(prep.splits), "a task's step ran eager"
    assert_same_training(eager, compiled, prep.logit_scale)
