"The embedded micro-CLIP: real loading path, deterministic features, an honest recipe, data disjoint from the demo classes."
import configparser
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from spa_toolkit.core import SpaError
from spa_toolkit.backbone import LOCAL_DIR, encode_images
from spa_toolkit.world import demo_classes, parts_classes, parts_pretrain_classes, pretrain_classes, synthetic_world
from spa_toolkit.fixtures import WEIGHTS_FILE
import spa_toolkit.microclip as mc

ROOT = Path(__file__).resolve().parent.parent


VARIANTS = list(mc.SHAPE_WORLDS)  # the worlds with a model of their own


def test_the_cifar_like_model_is_its_pretraining_shifted_as_its_recipe_says(tmp_path):
    """cifar_like ships its own pretraining (the recipe's knobs, recorded as the other worlds' are; their first steps are
    replayed below) with its towers shifted apart (05a_microclip): a shift moves only the two biases before the
    projections, and carries the pretraining record into the shifted model's recipe."""
    rec = mc.load_recipe(variant="cifar_like")
    assert rec["knobs"]["variant"] == "cifar_like" and rec["shift"]["a"] == 1.0
    assert rec["data"]["mark_caption_rate"] == mc.MICROCLIPS["cifar_like"].mark_caption_rate
    assert rec["sha256"] == mc.sha256_file(mc.embedded_clip_path("cifar_like") / WEIGHTS_FILE)
    assert rec["shift"]["source_sha256"] != rec["sha256"]  # the pretrained weights, before the shift
    shipped = load_file(mc.embedded_clip_path("cifar_like") / WEIGHTS_FILE)
    shifted = {"visual.ln_post.bias", "ln_final.bias"}
    src = mc.embedded_clip_path("cifar_like")
    twice = load_file(mc.shift_microclip(tmp_path / "twice", rec["shift"]["a"], source=src) / WEIGHTS_FILE)
    assert {k for k in shipped if not torch.equal(twice[k], shipped[k])} == shifted
    assert mc.load_recipe(tmp_path / "twice")["knobs"] == rec["knobs"]  # the pretraining record is carried over


def world_captions(variant):
    "(pretraining captions, world-class captions) of a variant's micro-CLIP."
    if variant == "cifar_like": return [mc.parts_caption(a) for a in parts_pretrain_classes()], [mc.parts_caption(a) for a in parts_classes()]
    return [mc.caption(a) for a in pretrain_classes()], [mc.caption(a) for a in demo_classes()]


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def clip(variant):
    return mc.load_embedded_clip(variant=variant)


PRETRAINED = list(mc.MICROCLIPS)  # every shipped model records its pretraining


@pytest.fixture(scope="module", params=PRETRAINED)
def pretrained(request):
    return request.param


@pytest.fixture(scope="module")
def recipe(pretrained):
    return mc.load_recipe(variant=pretrained)


def test_the_premise_world_is_the_default():
    assert mc.load_embedded_clip().arch == f"{LOCAL_DIR}{mc.embedded_clip_path('premise')}"
    assert mc.embedded_clip_path("control") != mc.embedded_clip_path("premise")
    with pytest.raises(SpaError, match="choose one of"): mc.load_embedded_clip(variant="nope")


def test_loads_through_open_clips_local_dir_path(clip, variant):
    assert clip.arch == f"{LOCAL_DIR}{mc.embedded_clip_path(variant)}"
    assert clip.model.visual.pool_type == mc.MICROCLIPS[variant].pool_type
    assert open_clip.get_tokenizer(clip.arch)(["a red circle with a dot."]).shape == (1, 32)
    assert clip.tokenizer.vocab_size == 49408
    shipped = load_file(mc.embedded_clip_path(variant) / WEIGHTS_FILE)
    assert (mc.embedded_clip_path(variant) / WEIGHTS_FILE).stat().st_size <= 10 * 2**20
    assert all(v.dtype == torch.float16 for v in shipped.values())
    loaded = clip.model.state_dict()
    assert set(shipped) == set(loaded)
    assert all(torch.equal(shipped[k].float(), loaded[k]) for k in shipped)


def test_features_are_deterministic(clip, variant):
    demo = mc.demo_images(n_per_class=1, variant=variant)
    x = torch.stack([clip.preprocess(demo.images[0])] * 2 + [clip.preprocess(demo.images[1])])
    f, again = encode_images(clip, x), encode_images(clip, x)
    assert torch.equal(f.global_[0], f.global_[1]) and torch.equal(f.patches[0], f.patches[1])
    assert torch.equal(f.global_, again.global_) and torch.equal(f.patches, again.patches)
    assert not torch.equal(f.global_[0], f.global_[2])


def test_shipped_weights_match_the_recipe(recipe, pretrained):
    variant = pretrained
    assert recipe["knobs"]["variant"] == variant
    assert mc.sha256_file(mc.embedded_clip_path(variant) / WEIGHTS_FILE) == recipe["sha256"]
    assert recipe["data"]["classes"] == world_captions(variant)[0]


def test_first_steps_replay_the_recorded_losses(recipe):
    "Re-run the first steps from the recorded seed (inside the warm-up, where the schedule does not depend on `steps`)."
    k = recipe["knobs"]
    n = min(5, k["warmup"])
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    try: run = mc.pretrain(**(k | dict(steps=n)), progress=False)
    finally: torch.set_num_threads(threads)
    assert run.losses == pytest.approx([recipe["loss_curve"][str(i)] for i in range(n)], rel=1e-5, abs=0)


def test_pretraining_data_is_disjoint_from_the_demo_classes(recipe, pretrained):
    variant = pretrained
    demo = set(world_captions(variant)[1])
    assert not demo & set(recipe["data"]["classes"])
    k = recipe["knobs"]
    batch, classes = (mc.parts_pretrain_batch, parts_pretrain_classes()) if variant == "cifar_like" else (mc.pretrain_batch, pretrain_classes())
    assert not demo & {c for s in range(3) for c in batch(classes, s, k["seed"], 128, k["variant"]).captions}
    assert set(recipe["data"]["demo_classes"]) == demo


def test_missing_weights_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(mc, "embedded_clip_path", lambda variant: tmp_path)
    with pytest.raises(SpaError, match="reinstall spa_toolkit"): mc.load_embedded_clip()


def test_package_data_ships_the_weights():
    "settings.ini's package_data globs (relative to the package) must cover every file of the model folder."
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    pkg = ROOT / "spa_toolkit"
    shipped = {p for pat in cfg["DEFAULT"]["package_data"].split() for p in pkg.glob(pat) if p.is_file()}
    assert all(set(mc.embedded_clip_path(v).iterdir()) <= shipped for v in VARIANTS)


def test_premise_gap_on_a_small_sample():
    "The premise world's patches tell part-only siblings apart far more often than its global view; the control's do not."
    small = dict(n_classes=12, n_train=10, n_test=10)
    gaps = {v: (lambda p: p.patch_view - p.global_view)(mc.premise_views(mc.load_embedded_clip(variant=v), synthetic_world(variant=v, **small)))
            for v in mc.SHAPE_WORLDS}
    assert gaps["premise"] >= 0.15, gaps
    assert gaps["control"] < 0.05, gaps
