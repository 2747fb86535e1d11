"Tests of spa_toolkit.world: the synthetic worlds are seeded, leave global RNGs alone, and have the structure they claim; the cifar_like world's three-part classes."
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
import numpy as np
import pytest
from spa_toolkit.base import SpaError
from spa_toolkit.catalog import WORLD_VARIANTS
from spa_toolkit.options import RunOptions
from spa_toolkit.world import (GENERIC_PHRASES, MARKS, cifar_like_world, parts_classes, parts_describe, parts_name,
                               parts_pretrain_classes, render_parts_sample)


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


def test_shape_of_cifar_100_b0inc10():
    classes = parts_classes()
    assert len(classes) == len(set(classes)) == 100
    assert len({(a.shape, a.colour) for a in classes}) == 25
    small = cifar_like_world(n_train=2, n_test=1)
    assert small.n_classes == 100 and len(small.splits("B0Inc10")) == 10
    assert all(len(t) == 10 for t in small.splits("B0Inc10"))


def test_siblings_share_the_look_and_some_marks():
    classes = parts_classes()
    for k in range(25):
        look = classes[4 * k:4 * k + 4]
        assert len({(a.shape, a.colour) for a in look}) == 1
        assert all(len(set(a.marks) & set(b.marks)) == 1 for a, b in zip(look, look[1:]))  # neighbours share a mark
        assert len({a.marks for a in look}) == 4
    assert all(len(a.marks) == 2 and a.marks[0] != a.marks[1] for a in classes)


def test_descriptions_name_every_part_and_generic_phrases():
    a = parts_classes()[7]
    d = parts_describe(a)
    assert all(any(m in p for p in d) for m in a.marks) and any(a.colour in p for p in d)
    assert d[-len(GENERIC_PHRASES):] == list(GENERIC_PHRASES)
    small = cifar_like_world(n_train=1, n_test=1)
    assert small.descriptions[parts_name(a)] == d


def test_pretraining_classes_are_disjoint_and_cover_the_rest():
    pre, world = set(parts_pretrain_classes()), set(parts_classes())
    assert not pre & world and len(pre) + len(world) == 36 * 10
    assert {parts_name(a) for a in pre}.isdisjoint({parts_name(a) for a in world})


def test_rendering_is_deterministic_and_the_marks_show():
    a = parts_classes()[0]
    img = lambda c, s: np.asarray(render_parts_sample(c, np.random.default_rng(s)).image, dtype=int)
    assert np.array_equal(img(a, 4), img(a, 4)) and not np.array_equal(img(a, 4), img(a, 5))
    other = next(m for m in MARKS if m not in a.marks)
    for j in range(2):  # changing either mark changes a small region only
        changed = (np.abs(img(a, 4) - img(a._replace(marks=tuple(other if i == j else m for i, m in enumerate(a.marks))), 4)).sum(-1) > 0).mean()
        assert 0 < changed < 0.1


def test_world_seed_changes_images_and_key():
    a, b = cifar_like_world(n_train=1, n_test=1), cifar_like_world(n_train=1, n_test=1, seed=1)
    assert a.key != b.key
    assert not np.array_equal(np.asarray(a.train[0]["image"]), np.asarray(b.train[0]["image"]))


def test_cifar_like_is_a_world_option():
    assert "cifar_like" in WORLD_VARIANTS
    assert RunOptions(world="cifar_like").world == "cifar_like"
    with pytest.raises(SpaError, match="choose one of"): RunOptions(world="cifar")


def test_synthetic_world_hands_cifar_like_its_own_size(monkeypatch):
    import spa_toolkit.world as w
    seen = {}
    monkeypatch.setattr(w, "cifar_like_world", lambda **kw: seen.update(kw) or "the cifar_like world")
    assert w.synthetic_world(variant="cifar_like", seed=3, class_order_seed=7) == "the cifar_like world"
    assert seen == dict(seed=3, class_order_seed=7, shuffle=True)
