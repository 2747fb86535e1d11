"Tests of spa_toolkit.data: the CLIP transform, ImageFolder / hub loading and its errors."
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



def test_clip_transform_any_mode_and_values():
    tf = clip_transform()
    for mode in ["L", "CMYK", "RGBA", "P", "RGB", "I"]:
        assert tf(Image.new(mode, (300, 120))).shape == (3, 224, 224)
    x = tf(Image.new("RGB", (50, 20), (255, 0, 0)))
    expect = (torch.tensor([1., 0., 0.]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 100, 100], expect, atol=1e-4)


def make_tree(root, classes, n=2, splits=("train", "test")):
    "A tiny ImageFolder tree of solid-colour JPEGs."
    for s in splits:
        for i, c in enumerate(classes):
            (root/s/c).mkdir(parents=True, exist_ok=True)
            for j in range(n): Image.new("RGB", (10, 8), ((37 * i) % 256, 20 * j, 90)).save(root/s/c/f"{j}.jpg")
    return root


def test_custom_imagefolder_benchmark(tmp_path):
    classes = [f"class_{i:02d}" for i in range(6)]
    root = make_tree(tmp_path/"mini", classes, n=3)
    b = load_benchmark(str(root), cache_dir=tmp_path/"hf", inc=2)
    assert (b.n_classes, len(b.train), len(b.test)) == (6, 18, 18)
    assert b.order == class_order(6) and b.class_names == [classes[i].replace("_", " ") for i in b.order]  # folder names as prompt text
    assert (b.setting_b0, b.setting_bx, b.templates) == ("B0Inc2", "B2Inc2", ["a photo of a {}."])
    for row in b.train:  # each image's colour identifies its folder, so labels can be checked against pixels
        original = b.order[row["label"]]
        assert row["image"].getpixel((5, 4))[0] == pytest.approx((37 * original) % 256, abs=6)
    assert b.key == load_benchmark(str(root), cache_dir=tmp_path/"hf").key


def test_registered_benchmark_from_data_root(tmp_path):
    info = benchmark_info("cars")
    make_tree(tmp_path/"cars", [f"{i:03d}" for i in range(info.n_classes)], n=1)
    b = load_benchmark("cars", data_root=tmp_path, cache_dir=tmp_path/"hf")
    assert b.class_names == [registry_class_names(info)[i] for i in class_order(100)]
    assert b.splits(b.setting_bx)[0] == list(range(50))
    assert b.train.features["label"].names == b.class_names


def test_data_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPA_DATA_ROOT", str(tmp_path))
    with pytest.raises(SpaError, match=f"{tmp_path}/ucf101 not found"): load_benchmark("ucf101")
    monkeypatch.delenv("SPA_DATA_ROOT")
    with pytest.raises(SpaError, match="needs --data-root"): load_benchmark("ucf101")


def test_missing_folder_error_names_folder_layout_and_source(tmp_path):
    with pytest.raises(SpaError) as e: load_benchmark("cub", data_root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path/"cub") in msg and "cub/{train,test}/<class>/*.jpg" in msg and "PROOF" in msg


def test_missing_split_folder(tmp_path):
    make_tree(tmp_path/"sun", ["a"], splits=("train",))
    with pytest.raises(SpaError, match="sun/test not found"): load_benchmark("sun", data_root=tmp_path)


def test_train_classes_without_test(tmp_path):
    make_tree(tmp_path/"t", ["a", "b", "c"], splits=("train",)); make_tree(tmp_path/"t", ["a"], splits=("test",))
    with pytest.raises(SpaError, match=r"classes in train/ without test/: \['b', 'c'\]"): load_benchmark(str(tmp_path/"t"))


def test_empty_class_folder(tmp_path):
    make_tree(tmp_path/"t", ["a", "b"])
    for f in (tmp_path/"t"/"test"/"b").iterdir(): f.unlink()
    with pytest.raises(SpaError, match=r"no images in .*test: \['b'\]"): load_benchmark(str(tmp_path/"t"))


def test_wrong_class_count_for_registered_benchmark(tmp_path):
    make_tree(tmp_path/"aircraft", ["x", "y"])
    with pytest.raises(SpaError, match="holds 2 class folders but aircraft has 100"): load_benchmark("aircraft", data_root=tmp_path)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(SpaError) as e: load_benchmark("cifar10")
    assert all(b.name in str(e.value) for b in BENCHMARKS)


def test_cifar_offline_not_cached(tmp_path):
    with pytest.raises(SpaError, match="pre-download|download it once") as e: load_benchmark("cifar100", cache_dir=tmp_path/"empty")
    assert "data_root=" in str(e.value)


def test_cifar_from_data_root_folder(tmp_path, monkeypatch):
    make_tree(tmp_path/"cifar100", registry_class_names(benchmark_info("cifar100")), n=1)
    b = load_benchmark("cifar100", data_root=tmp_path, cache_dir=tmp_path/"hf")
    assert b.class_names[b.order.index(26)] == "crab"
    monkeypatch.setenv("SPA_DATA_ROOT", str(tmp_path))  # the environment variable finds the folder too (no hub call)
    assert load_benchmark("cifar100", cache_dir=tmp_path/"hf").key == b.key


def test_folders_the_loader_skips_do_not_shift_labels(tmp_path):
    root = make_tree(tmp_path/"t", ["ant", "cat", "dog"])
    make_tree(root, ["__MACOSX", ".cache"])  # archive debris: datasets' imagefolder skips such folders
    b = load_benchmark(str(root), cache_dir=tmp_path/"hf", shuffle=False)
    assert b.class_names == ["ant", "cat", "dog"] and b.train.features["label"].names == b.class_names
    for row in b.train: assert row["image"].getpixel((5, 4))[0] == pytest.approx(37 * row["label"], abs=6)


def id_tree(root, folders, ids, n=1):
    "An ImageFolder tree whose PNGs carry their original class id in the pixel (lossless: exact)."
    for s in ("train", "test"):
        for f, i in zip(folders, ids):
            (root/s/f).mkdir(parents=True, exist_ok=True)
            for j in range(n): Image.new("RGB", (6, 5), (i % 256, i // 256, j)).save(root/s/f/f"{j}.png")
    return root


def pixel_ids(split) -> list[int]:
    r, g, _ = zip(*(row["image"].getpixel((1, 1)) for row in split))
    return [a + 256 * b for a, b in zip(r, g)]


def check_labels(b):
    "Every image's label is its true class, in both splits."
    for split in (b.train, b.test): assert [b.order[y] for y in split["label"]] == pixel_ids(split)


def test_class_folder_named_like_a_split_stays_in_its_split(tmp_path):
    names = registry_class_names(benchmark_info("cifar100"))
    assert "train" in names  # CIFAR-100 has a class "train": datasets' imagefolder took its test images for train
    id_tree(tmp_path/"cifar100", names, range(100))
    b = load_benchmark("cifar100", data_root=tmp_path)
    assert (len(b.train), len(b.test)) == (100, 100)
    check_labels(b)


CUB = registry_class_names(benchmark_info("cub"))


CUB_TREES = {"authors'": [f"{i + 1:03d}.{c.replace(' ', '_')}" for i, c in enumerate(CUB)],
             "unprefixed": [c.replace(" ", "_") for c in CUB], "lower-case": [c.lower() for c in CUB],
             "numbered": [str(i + 1) for i in range(200)]}


@pytest.mark.parametrize("scheme", CUB_TREES)
def test_class_folders_matched_by_name_not_sort_order(tmp_path, scheme):
    id_tree(tmp_path/"cub", CUB_TREES[scheme], range(200))
    b = load_benchmark("cub", data_root=tmp_path)
    check_labels(b)
    assert b.folders[CUB_TREES[scheme][3]] == CUB[3] and len(b.folders) == 200


def test_cifar_export_in_numbered_folders(tmp_path):
    id_tree(tmp_path/"cifar100", [str(i) for i in range(100)], range(100))
    check_labels(load_benchmark("cifar100", data_root=tmp_path))


def test_class_folders_that_match_no_class_are_refused(tmp_path):
    folders = CUB_TREES["authors'"][:-1] + ["200.Mystery_bird"]
    id_tree(tmp_path/"cub", folders, range(200))
    with pytest.raises(SpaError, match=r"1 class folder\(s\) match no class name of the protocol, e.g. \['200.Mystery_bird'\]") as e:
        load_benchmark("cub", data_root=tmp_path)
    assert "\n" not in str(e.value) and "labels.json" in str(e.value)


def test_imagenet_r_wordnet_folders_keep_the_authors_sorted_order(tmp_path):
    wnids = [f"n{1000000 + 37 * i:08d}" for i in range(200)]
    id_tree(tmp_path/"imagenet-r", wnids, range(200))  # the authors' folder name for the benchmark
    b = load_benchmark("imagenetr", data_root=tmp_path)
    check_labels(b)
    assert load_benchmark("imagenet-r", data_root=tmp_path).key == b.key


def test_authors_folder_name_under_the_data_root(tmp_path):
    id_tree(tmp_path/"ucf", registry_class_names(benchmark_info("ucf101")), range(100))
    check_labels(load_benchmark("ucf101", data_root=tmp_path))


def hub_copy(n_per_class=1) -> "datasets.DatasetDict":
    "A small stand-in for uoft-cs/cifar100 as `datasets` holds it: columns img / fine_label, the hub's label names."
    import datasets
    names = [c.replace(" ", "_") for c in registry_class_names(benchmark_info("cifar100"))]
    names[26] = "cra"
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=names)})
    ids = [i for i in range(100) for _ in range(n_per_class)]
    rows = {"img": [Image.new("RGB", (6, 5), (i, 0, 0)) for i in ids], "fine_label": ids}
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=feats) for s in ("train", "test")})


@pytest.mark.parametrize("fmt", ["save_to_disk", "parquet"])
def test_cifar_from_a_saved_datasets_copy(tmp_path, fmt):
    dd = hub_copy()
    if fmt == "save_to_disk": dd.save_to_disk(str(tmp_path/"cifar100"))
    else:
        for s in dd: dd[s].to_parquet(str(tmp_path/"cifar100"/"data"/f"{s}-00000-of-00001.parquet"))
    b = load_benchmark("cifar100", data_root=tmp_path, cache_dir=tmp_path/"hf")
    check_labels(b)
    assert b.folders["cra"] == "crab" and b.class_names[b.order.index(26)] == "crab"
