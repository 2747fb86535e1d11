"Tests of spa_toolkit.catalog: PyCIL class orders, settings and splits, the benchmark registry."
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



def pycil_order(n, seed=1993):
    "PyCIL's recipe, global seeding and all, with numpy's global state restored afterwards."
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(n).tolist()
    finally: np.random.set_state(state)


@pytest.mark.parametrize("n", [100, 200, 300])
def test_class_order_matches_pycil(n):
    assert class_order(n) == pycil_order(n)
    assert class_order(n, seed=7) == pycil_order(n, seed=7)
    assert sorted(class_order(n)) == list(range(n))


def test_class_order_leaves_global_rng_alone():
    np.random.seed(3); expected = np.random.rand()
    np.random.seed(3); class_order(100); got = np.random.rand()
    assert got == expected


@pytest.mark.parametrize("info", BENCHMARKS, ids=lambda b: b.name)
def test_registered_settings_split_shapes(info):
    for setting in (info.setting_b0, info.setting_bx):
        base, inc = parse_setting(setting, info.n_classes)
        tasks = make_splits(info.n_classes, base, inc)
        assert [len(t) for t in tasks] == [base] + [inc] * ((info.n_classes - base) // inc)
        assert sum(tasks, []) == list(range(info.n_classes))
    assert len(registry_class_names(info)) == info.n_classes


def test_registry_facts():
    expected = dict(cifar100=(100, 10, 50), cub=(200, 20, 100), imagenetr=(200, 20, 100), objectnet=(200, 20, 100),
                    aircraft=(100, 10, 50), cars=(100, 10, 50), food101=(100, 10, 50), sun=(300, 30, 150), ucf101=(100, 10, 50))
    got = {b.name: (b.n_classes, parse_setting(b.setting_b0, b.n_classes)[1], parse_setting(b.setting_bx, b.n_classes)[0]) for b in BENCHMARKS}
    assert got == expected
    assert registry_class_names(benchmark_info("cifar100"))[26] == "crab"  # the hub card's "cra"
    assert registry_class_names(benchmark_info("cars"))[-1] == "FIAT 500 Convertible 2012"  # first 100 of labels.json's 102 (2 Ferraris unused)


@pytest.mark.parametrize("bad", ["B0Inc0", "Inc10", "B10", "B0Inc7", "B120Inc10", "B0Inc10x", ""])
def test_bad_settings(bad):
    with pytest.raises(SpaError, match="setting"): parse_setting(bad, 100)


def test_make_splits_rejects_sizes_that_do_not_divide():
    with pytest.raises(SpaError, match="does not fit 100 classes"): make_splits(100, 10, 7)
