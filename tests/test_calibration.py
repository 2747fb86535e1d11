"Gaussian calibration: Ledoit-Wolf against sklearn, sample moments, merging, determinism, memory formula, bad inputs."
import dataclasses, io, os
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True"); os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np, pytest, torch
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf
from spa_toolkit.core import SpaError, make_generator
from spa_toolkit.calibration import (COV_KINDS, ClassStats, class_stats, ledoit_wolf, merge_stats, patch_stats,
                                     sample_pseudo, sample_pseudo_patches, stats_bytes, stats_bytes_for)

D = 5

def toy(n_per_class=40, classes=(3, 8, 11), d=D, seed=0):
    "Features from class Gaussians with different means and correlated covariances."
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n_per_class, d, generator=g) @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g)) + 2 * c
          for c in range(len(classes))]
    return torch.cat(xs), torch.tensor(classes).repeat_interleave(n_per_class)

@pytest.mark.parametrize("n,d", [(50, 5), (8, 20), (300, 3), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ledoit_wolf_matches_sklearn(n, d, dtype):
    x = torch.randn(n, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    cov, s = sk_ledoit_wolf(x.numpy())
    ours = ledoit_wolf(x.to(dtype))
    np.testing.assert_allclose(ours.cov.double().numpy(), cov, atol=1e-5 * max(1, np.abs(cov).max()), rtol=1e-5)
    assert abs(float(ours.shrinkage) - s) < 1e-5

def test_per_class_full_factors_are_sklearn_ledoit_wolf():
    x, y = toy()
    st = class_stats(x.double(), y)
    for i, c in enumerate(st.classes):
        cov, _ = sk_ledoit_wolf(x[y == c].double().numpy())
        np.testing.assert_allclose((st.factor[i] @ st.factor[i].T).numpy(), cov, atol=1e-10)

def stored_cov(st, i):
    "The covariance of class row `i` that sampling should reproduce."
    if st.cov == "full": return st.factor[i] @ st.factor[i].T
    if st.cov == "diag": return torch.diag(st.factor[i] ** 2)
    return st.factor @ st.factor.T

@pytest.mark.parametrize("cov", ["full", "diag", "shared"])
def test_sample_moments_converge_to_stored(cov):
    x, y = toy()
    st = class_stats(x, y, cov=cov)
    ps = sample_pseudo(st, 20_000, make_generator(0))
    assert ps.feats.shape == (60_000, D)
    for i, c in enumerate(st.classes):
        f = ps.feats[ps.labels == c].double()
        assert len(f) == 20_000
        torch.testing.assert_close(f.mean(0), st.means[i].double(), atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(f.T), stored_cov(st, i).double(), atol=0.08, rtol=0.05)

def test_none_samples_are_the_means():
    x, y = toy()
    st = class_stats(x, y, cov="none")
    ps = sample_pseudo(st, 3, make_generator(0))
    assert torch.equal(ps.feats, st.means.repeat_interleave(3, 0))

def test_patch_sample_moments_converge_to_stored():
    g = torch.Generator().manual_seed(1)
    k = 4
    patches = torch.randn(90, k, D, generator=g) * torch.linspace(0.5, 2, D) + torch.arange(k)[:, None]
    labels = torch.tensor([1, 2, 5]).repeat(30)
    pst = patch_stats(patches, labels)
    ps = sample_pseudo_patches(pst, 20_000, make_generator(0), classes=torch.tensor([5]))
    assert ps.feats.shape == (20_000, k, D) and bool((ps.labels == 5).all())
    torch.testing.assert_close(ps.feats.mean(0), patches[labels == 5].mean(0), atol=0.06, rtol=0)
    torch.testing.assert_close(ps.feats.var(0), pst.stats.factor.view(3, k, D)[2] ** 2, atol=0.08, rtol=0.05)

@pytest.mark.parametrize("cov", COV_KINDS)
def test_sampling_is_deterministic_per_generator_and_leaves_global_rng(cov):
    x, y = toy()
    st = class_stats(x, y, cov=cov)
    state = torch.random.get_rng_state()
    a, b = sample_pseudo(st, 7, make_generator(5)), sample_pseudo(st, 7, make_generator(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.feats, b.feats) and torch.equal(a.labels, b.labels)
    if cov != "none": assert not torch.equal(a.feats, sample_pseudo(st, 7, make_generator(6)).feats)

def test_variable_counts_and_class_subset():
    x, y = toy()
    st = class_stats(x, y)
    ps = sample_pseudo(st, torch.tensor([0, 4]), make_generator(0), classes=torch.tensor([11, 3]))
    assert ps.labels.tolist() == [3] * 4 and ps.feats.shape == (4, D)
    assert sample_pseudo(st, st.counts, make_generator(0)).labels.tolist() == y.sort().values.tolist()

@pytest.mark.parametrize("cov", COV_KINDS)
def test_merging_tasks_equals_computing_at_once(cov):
    x, y = toy()
    whole = class_stats(x, y, cov=cov)
    merged = merge_stats(class_stats(x[y == 11], y[y == 11], cov=cov), class_stats(x[y < 11], y[y < 11], cov=cov))
    assert torch.equal(merged.classes, whole.classes) and torch.equal(merged.counts, whole.counts)
    torch.testing.assert_close(merged.means, whole.means)
    if cov != "none": torch.testing.assert_close(merged.factor, whole.factor)

def test_stats_save_load_round_trip():
    x, y = toy()
    for st in (class_stats(x, y, cov="shared"), class_stats(x, y, shrink=0.1)):
        buf = io.BytesIO(); torch.save(dataclasses.asdict(st), buf); buf.seek(0)
        back = ClassStats(**torch.load(buf, weights_only=True))
        assert torch.equal(sample_pseudo(back, 5, make_generator(0)).feats, sample_pseudo(st, 5, make_generator(0)).feats)

@pytest.mark.parametrize("cov", COV_KINDS)
def test_memory_formula_matches_real_objects(cov):
    x, y = toy(d=12)
    assert stats_bytes(class_stats(x, y, cov=cov)) == stats_bytes_for(3, 12, cov)
    assert stats_bytes(patch_stats(x.view(-1, 2, 6), y, cov=cov)) == stats_bytes_for(3, 6, cov, slots=2)

def test_fewer_than_two_samples():
    x, y = toy()
    x, y = torch.cat([x, x[:1]]), torch.cat([y, torch.tensor([42])])
    for cov in ("full", "diag"):
        with pytest.raises(SpaError, match=r"classes \[42\] have fewer than 2 samples.*cov='shared'"): class_stats(x, y, cov=cov)
    assert class_stats(x, y, cov="shared").counts[-1] == 1          # documented fallback: pool the classes

def test_bad_inputs():
    x, y = toy()
    bad = x.clone(); bad[3, 2] = float("nan")
    with pytest.raises(SpaError, match="features for class statistics holds 1 NaN"): class_stats(bad, y)
    with pytest.raises(SpaError, match="choose one of"): class_stats(x, y, cov="lowrank")
    with pytest.raises(SpaError, match="gamma >= 0"): class_stats(x, y, shrink="oas")
    with pytest.raises(SpaError, match="integer labels"): class_stats(x, y.float())
    with pytest.raises(SpaError, match=r"labels \[8, 11\] not among"): class_stats(x, y, classes=torch.tensor([3]))
    st = class_stats(x, y)
    with pytest.raises(SpaError, match=r"classes \[99\] not among"): sample_pseudo(st, 2, make_generator(0), classes=torch.tensor([99]))
    with pytest.raises(SpaError, match="n_per_class"): sample_pseudo(st, -1, make_generator(0))
    with pytest.raises(SpaError, match="same knobs"): merge_stats(st, class_stats(x, y, shrink=0.1))

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_statistics_sample_on_cuda():
    x, y = toy()
    st = class_stats(x.cuda(), y.cuda())
    assert st.factor.device.type == "cuda"
    assert sample_pseudo(st, 3, make_generator(0, "cuda")).feats.device.type == "cuda"
    with pytest.raises(SpaError, match="make_generator"): sample_pseudo(st, 3, make_generator(0))


def diag_ledoit_wolf_reference(x: np.ndarray) -> np.ndarray:
    "Ledoit & Wolf (2004) with the sample covariance restricted to its diagonal, written from the paper's d^2 and b^2 (numpy)."
    n, p = x.shape
    r = x - x.mean(0)
    v = (r ** 2).mean(0)  # the diagonal of S
    m = v.mean()  # target m * I
    d2 = ((v - m) ** 2).sum() / p  # ||S - mI||^2 / p on the diagonal
    b2 = sum((((rk ** 2) - v) ** 2).sum() / p for rk in r) / n ** 2  # mean squared distance of x_k x_k^T to S, diagonal only
    s = min(b2, d2) / d2
    return (1 - s) * v + s * m


def test_diagonal_ledoit_wolf_matches_an_independent_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 20, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 20, dtype=torch.float64)  # n << d: strong shrinkage
    ref = diag_ledoit_wolf_reference(x.numpy())
    st = class_stats(x, torch.zeros(6, dtype=torch.long), cov="diag")
    np.testing.assert_allclose(st.factor[0].square().numpy(), ref, rtol=1e-10)
    assert not np.allclose(ref, x.var(0, unbiased=False).numpy(), rtol=1e-3)  # the shrinkage is large enough to be seen


@pytest.mark.parametrize("call, needle", [
    (lambda x, y: class_stats(x.long(), y), "pass x.float()"),
    (lambda x, y: class_stats(x.numpy(), y), "must be a torch tensor, got ndarray"),
    (lambda x, y: sample_pseudo(class_stats(x, y), 2, 0), "got int: pass make_generator(seed)"),
    (lambda x, y: sample_pseudo(class_stats(x, y), 2.5, make_generator(0)), "n_per_class must be whole numbers"),
])
def test_library_inputs_are_checked(call, needle):
    x, y = toy()
    with pytest.raises(SpaError, match=needle.replace("(", r"\(").replace(")", r"\)")): call(x, y)
