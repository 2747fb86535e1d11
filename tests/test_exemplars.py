"Exemplar selection: determinism, edge cases, and herding against a plain reference implementation."
import warnings
import numpy as np
import pytest
import torch

from spa_toolkit.core import SpaError
from spa_toolkit.exemplars import METHODS, exemplars_by_class, rank_exemplars, select_exemplars

def feats(n=40, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))

@pytest.mark.parametrize("method", METHODS)
def test_distinct_long_indices_deterministic(method):
    x = feats()
    a, b = select_exemplars(x, k_exemplars=5, method=method), select_exemplars(x.clone(), k_exemplars=5, method=method)
    assert a.dtype == torch.long and a.shape == (5,) and len(set(a.tolist())) == 5
    assert a.min() >= 0 and a.max() < len(x) and torch.equal(a, b)

@pytest.mark.parametrize("method", METHODS)
def test_k_above_n_returns_every_sample(method):
    assert sorted(select_exemplars(feats(3), k_exemplars=5, method=method).tolist()) == [0, 1, 2]
    assert select_exemplars(feats(1), k_exemplars=5, method=method).tolist() == [0]

def test_kmeans_seed_changes_clustering_on_unstructured_data():
    x = feats(200, 8)
    picks = {tuple(select_exemplars(x, k_exemplars=5, seed=s, n_init=1).tolist()) for s in range(5)}
    assert len(picks) > 1  # the seed is really used

def test_kmeans_orders_by_cluster_size():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(6)[:3] * 5
    sizes = [5, 15, 10]
    x = torch.cat([centres[i] + 0.2 * torch.randn(s, 6, generator=g) for i, s in enumerate(sizes)])
    mode = torch.tensor(sum(([i] * s for i, s in enumerate(sizes)), []))
    assert mode[select_exemplars(x, k_exemplars=3)].tolist() == [1, 2, 0]

def test_kmeans_with_duplicates_still_distinct():
    x = torch.tensor([[1., 0.]] * 5 + [[0., 1.]] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        picks = select_exemplars(x, k_exemplars=4)
    assert len(set(picks.tolist())) == 4

def herding_reference(x, m):
    "iCaRL's herding loop (numpy, as in PyCIL's _construct_exemplar)."
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mu, chosen, acc = x.mean(0), [], np.zeros(x.shape[1])
    for k in range(1, m + 1):
        d = np.sqrt(((mu - (acc + x) / k) ** 2).sum(1))
        d[chosen] = np.inf
        i = int(np.argmin(d)); chosen.append(i); acc += x[i]
    return chosen

def test_herding_matches_reference():
    x = feats(30, 8, seed=3)
    assert rank_exemplars(x, "herding", n=10).tolist() == herding_reference(x.double().numpy(), 10)

def test_kcenter_second_pick_is_farthest_from_first():
    x = feats(30, 8, seed=4)
    xn = torch.nn.functional.normalize(x, dim=1)
    first, second = rank_exemplars(x, "kcenter", n=2).tolist()
    assert first == int(((xn - xn.mean(0)) ** 2).sum(1).argmin())
    assert second == int(((xn - xn[first]) ** 2).sum(1).argmax())

def test_rankings_are_nested():
    x = feats()
    for m in ("herding", "kcenter", "closest"):
        assert torch.equal(select_exemplars(x, k_exemplars=3, method=m), rank_exemplars(x, m)[:3])

def test_bad_inputs():
    with pytest.raises(SpaError, match="choose one of"): select_exemplars(feats(), method="random")
    with pytest.raises(SpaError, match=r"\[n, d\]"): select_exemplars(torch.randn(4))
    with pytest.raises(SpaError, match="ask for k_exemplars >= 1"): select_exemplars(feats(), k_exemplars=0)
    with pytest.raises(SpaError, match="NaN"): select_exemplars(torch.full((3, 2), float("nan")))
    with pytest.raises(SpaError, match="one label per row"): exemplars_by_class(feats(4), torch.zeros(5))

def test_exemplars_by_class_returns_global_indices_of_each_class():
    x, labels = feats(60), torch.arange(60) % 3
    out = exemplars_by_class(x, labels, k_exemplars=4, method="herding")
    assert sorted(out) == [0, 1, 2]
    for c, idx in out.items():
        assert (labels[idx] == c).all() and len(idx) == 4
        assert torch.equal(idx, (labels == c).nonzero().flatten()[rank_exemplars(x[labels == c], "herding", n=4)])
