"Tests of spa_toolkit.world: the synthetic world is seeded, leaves global RNGs alone, and has the structure it claims."
import os
for _k, _v in dict(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1").items(): os.environ.setdefault(_k, _v)

import numpy as np
import pytest
import torch
from PIL import Image

from spa_toolkit.core import SpaError
from spa_toolkit.catalog import BENCHMARKS, benchmark_info, class_order, make_splits, parse_setting, registry_class_names
from spa_toolkit.data import CLIP_MEAN, CLIP_STD, clip_transform, load_benchmark
from spa_toolkit.world import Attributes, demo_classes, pretrain_classes, render_sample, synthetic_world, world_attributes



def test_synthetic_world_deterministic_and_seeded():
    kw = dict(n_classes=8, n_train=3, n_test=2)
    a, b, c = synthetic_world(**kw), synthetic_world(**kw), synthetic_world(**kw, seed=1)
    pix = lambda ds: np.stack([np.asarray(im) for im in ds["image"]])
    assert np.array_equal(pix(a.train), pix(b.train)) and np.array_equal(pix(a.test), pix(b.test))
    assert a.train["label"][:] == b.train["label"][:] and a.key == b.key
    assert not np.array_equal(pix(a.train), pix(c.train)) and a.key != c.key
    assert not np.array_equal(pix(a.train)[0], pix(a.test)[0])  # train and test draw from different streams


def test_synthetic_world_does_not_touch_global_rngs():
    np.random.seed(5); torch.manual_seed(5)
    synthetic_world(n_classes=4, n_train=2, n_test=1, inc=2)
    got = (np.random.rand(), torch.rand(1).item())
    np.random.seed(5); torch.manual_seed(5)
    assert got == (np.random.rand(), torch.rand(1).item())


def test_synthetic_world_structure():
    w = synthetic_world(n_train=2, n_test=1)
    assert (w.n_classes, w.setting_b0, w.setting_bx) == (24, "B0Inc4", "B12Inc4") and len(w.splits()) == 6
    looks = {}
    for a in demo_classes(): looks.setdefault((a.shape, a.colour), set()).add(a.mark)
    assert all(len(m) == 3 for m in looks.values())  # every look: 3 classes differing only in the mark
    assert set(w.descriptions) == set(w.class_names) and all(len(d) == 3 for d in w.descriptions.values())
    vocab = world_attributes()
    assert set(pretrain_classes()).isdisjoint(demo_classes())
    assert len(pretrain_classes()) + 24 == len(vocab["shape"]) * len(vocab["colour"]) * len(vocab["mark"])


def test_render_any_combination():
    rng = np.random.default_rng(0)
    for a in pretrain_classes()[::17]:
        im, cap = render_sample(a, rng, image_size=32, distractors=0, noise=0)
        assert im.size == (32, 32) and a.mark in cap and a.shape in cap and a.colour in cap


def test_mark_is_the_only_difference():
    "Same generator stream, different mark: the images differ only in a small region."
    a, b = Attributes("circle", "red", "dot"), Attributes("circle", "red", "cross")
    x, y = (np.asarray(render_sample(v, np.random.default_rng(3), noise=0).image).astype(int) for v in (a, b))
    changed = np.abs(x - y).sum(-1) > 30
    assert 0 < changed.sum() < 0.05 * changed.size


def test_bad_world_sizes():
    with pytest.raises(SpaError, match="does not exist"): synthetic_world(n_classes=500)
    with pytest.raises(SpaError, match="does not fit"): synthetic_world(n_classes=10, n_train=1, n_test=1, inc=4)
