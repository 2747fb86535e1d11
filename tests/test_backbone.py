"Loading, encoders and the feature cache of spa_toolkit.backbone, on the tiny CLIP (offline, CPU, seconds)."
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spa_toolkit.backbone import (FORMAT_VERSION, LOCAL_DIR, device_transform, encode_images, encode_text_tokens,
                                  encode_texts, extract_features, load_clip, open_features)
from spa_toolkit.core import SpaError, l2norm
from spa_toolkit.fixtures import TINY_ARCH, tiny_images


class Rows:
    "A list-backed (image, label) dataset that counts row reads and can fail at a given row."
    def __init__(self, n, fail_at=None, seed=0):
        self.rows = [{"image": im, "label": i % 3} for i, im in enumerate(tiny_images(n, size=32, seed=seed))]
        self.fail_at, self.reads = fail_at, 0

    def __len__(self): return len(self.rows)

    def __getitem__(self, i):
        if i == self.fail_at: raise RuntimeError(f"simulated crash at row {i}")
        self.reads += 1
        return self.rows[i]


def batch(clip, images): return torch.stack([clip.preprocess(im) for im in images])


# --- loading -------------------------------------------------------------------------------------------------

def test_file_and_folder_load_the_same_weights(tiny_clip, tiny_clip_dir):
    by_folder = load_clip(pretrained=tiny_clip_dir)
    by_prefix = load_clip(f"{LOCAL_DIR}{tiny_clip_dir}")
    for m in (by_folder.model, by_prefix.model):
        for (k, a), b in zip(tiny_clip.model.state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), k
    assert by_folder.key == by_prefix.key != tiny_clip.key
    assert (by_folder.arch, by_folder.pretrained) == (by_prefix.arch, by_prefix.pretrained) == (f"{LOCAL_DIR}{tiny_clip_dir.resolve()}", "")
    assert (tiny_clip.embed_dim, tiny_clip.n_patches, tiny_clip.image_size) == (32, 16, 32)
    assert not tiny_clip.model.training and not any(p.requires_grad for p in tiny_clip.model.parameters())


def test_random_weights_need_opt_in(tiny_clip_file):  # the fixture registers TINY_ARCH with open_clip
    for empty in (None, ""):
        with pytest.raises(SpaError, match="--pretrained random"): load_clip(TINY_ARCH, empty)
    a, b = (load_clip(TINY_ARCH, None, allow_random=True, seed=s) for s in (0, 0))
    assert a.key == b.key and torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert load_clip(TINY_ARCH, None, allow_random=True, seed=1).key != a.key


def test_bad_path_tag_arch_and_file_errors(tiny_clip_file, tmp_path):  # tiny_clip_file: TINY_ARCH registered
    with pytest.raises(SpaError, match="check the path"): load_clip(TINY_ARCH, str(tmp_path / "nope.pt"))
    with pytest.raises(SpaError, match="laion400m_e32"): load_clip("ViT-B-16", "laion400m_e99")
    with pytest.raises(SpaError, match="ViT-B-16"): load_clip("ViT-B-61", "laion400m_e32")
    with pytest.raises(SpaError, match="open_clip_config.json"): load_clip(f"{LOCAL_DIR}{tmp_path}")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SpaError, match="trained with this architecture"): load_clip(TINY_ARCH, tmp_path / "other.safetensors")


def test_offline_tag_not_cached_explains_the_fix(tmp_path):
    import huggingface_hub.constants
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest sets it before any import
    with pytest.raises(SpaError, match=r"run this once with network access") as e:
        load_clip("ViT-B-16", "laion400m_e32", cache_dir=str(tmp_path))
    # the installed hub client's command (huggingface-cli is gone), and the CLI's option beside the Python keyword
    assert "`hf download timm/" in str(e.value) and "--pretrained PATH" in str(e.value) and "huggingface-cli" not in str(e.value)


# --- encoders ------------------------------------------------------------------------------------------------

def test_image_features_match_open_clip(tiny_clip, tiny_images):
    x = batch(tiny_clip, tiny_images[:4])
    f = encode_images(tiny_clip, x)
    assert f.global_.shape == (4, 32) and f.patches.shape == (4, 16, 32)
    torch.testing.assert_close(f.global_, tiny_clip.model.encode_image(x, normalize=True), atol=1e-5, rtol=1e-5)
    v = tiny_clip.model.visual
    v.output_tokens = True
    try: _, tokens = v(x)
    finally: v.output_tokens = False
    torch.testing.assert_close(f.patches, l2norm(tokens @ v.proj), atol=1e-5, rtol=1e-5)
    fv = encode_images(tiny_clip, x, patch_source="value")
    assert fv.patches.shape == f.patches.shape and not torch.allclose(fv.patches, f.patches)
    assert encode_images(tiny_clip, x, patches=False).patches is None


def test_text_features_match_open_clip(tiny_clip):
    texts = ["a photo of a cat.", "a red square", "x"]
    ids = tiny_clip.tokenizer(texts)
    want = tiny_clip.model.encode_text(ids, normalize=True)
    torch.testing.assert_close(encode_texts(tiny_clip, texts, batch_size=2), want, atol=1e-5, rtol=1e-5)
    tt = encode_text_tokens(tiny_clip, texts, batch_size=2)
    assert tt.tokens.shape == (3, 77, 32) and tt.mask.dtype == torch.bool
    assert tt.mask.sum(1).tolist() == (ids != 0).sum(1).tolist()
    torch.testing.assert_close(tt.tokens[torch.arange(3), ids.argmax(-1)], want, atol=1e-5, rtol=1e-5)
    assert tt.tokens[~tt.mask].abs().sum() == 0


# --- feature cache -------------------------------------------------------------------------------------------

def test_cache_miss_then_hit_reads_no_rows(tiny_clip, tmp_path):
    data = Rows(10)
    fs = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=4)
    assert data.reads == 10 and fs.meta["complete"] and fs.meta["n_done"] == 10
    ref = encode_images(tiny_clip, batch(tiny_clip, [r["image"] for r in data.rows]))
    np.testing.assert_allclose(fs.global_, ref.global_.numpy(), atol=2e-3)
    np.testing.assert_allclose(fs.patches, ref.patches.numpy(), atol=2e-3)
    assert fs.labels.tolist() == [i % 3 for i in range(10)]
    again = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=4)
    assert data.reads == 10 and again.folder == fs.folder  # a hit: no row was read again
    extract_features(tiny_clip, data, tmp_path, "toy-test", batch_size=4)
    assert data.reads == 20  # another name is another cache


def test_patches_are_memory_mapped_read_only(tiny_clip, tmp_path):
    fs = extract_features(tiny_clip, Rows(6), tmp_path, "toy", batch_size=4)
    assert isinstance(fs.patches, np.memmap) and isinstance(fs.global_, np.memmap)
    assert Path(fs.patches.filename).parent == fs.folder and fs.patches.dtype == np.float16
    with pytest.raises(ValueError): fs.patches[0, 0, 0] = 1  # opened read-only, never copied into RAM


def test_compact_and_none_modes(tiny_clip, tmp_path):
    data = Rows(6)
    full = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=4)
    top = extract_features(tiny_clip, data, tmp_path, "toy", patches=5, batch_size=4)
    assert top.patches.shape == (6, 5, 32) and top.patch_idx.shape == (6, 5) and top.folder != full.folder
    np.testing.assert_array_equal(top.patches, np.take_along_axis(np.asarray(full.patches), top.patch_idx[..., None].astype(int), 1))
    sims = np.einsum("bnd,bd->bn", full.patches.astype(np.float32), full.global_.astype(np.float32))
    np.testing.assert_array_equal(top.patch_idx[:, 0], sims.argmax(1))
    assert extract_features(tiny_clip, data, tmp_path, "toy", patches="none").patches is None
    for bad in (0, 17, True, "some"):
        with pytest.raises(SpaError, match="'all', 'none'"): extract_features(tiny_clip, data, tmp_path, "toy", patches=bad)


@pytest.mark.parametrize("field,value", [("format_version", FORMAT_VERSION + 1), ("key", "0" * 16), ("n", 99)])
def test_stale_cache_is_rejected_then_refreshed(tiny_clip, tmp_path, field, value):
    data = Rows(5)
    fs = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=4)
    meta = json.loads((fs.folder / "meta.json").read_text())
    (fs.folder / "meta.json").write_text(json.dumps(meta | {field: value}))
    with pytest.raises(SpaError, match=rf"{fs.folder}.*{field}.*refresh=True"):
        extract_features(tiny_clip, data, tmp_path, "toy", batch_size=4)
    fresh = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=4, refresh=True)
    assert data.reads == 10 and fresh.meta[field] == meta[field]
    np.testing.assert_array_equal(fresh.patches, fs.patches)


def test_norms_and_pre_projection_round_trip(tiny_clip, tmp_path):
    "The cache's unit rows times their norms are the model's raw embeddings; its pre-projection rows project onto them."
    data = Rows(7)
    fs = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=3)
    x = batch(tiny_clip, [r["image"] for r in data.rows])
    raw, v = tiny_clip.model.encode_image(x), tiny_clip.model.visual
    assert fs.global_norm.dtype == np.float32 and fs.global_norm.shape == (7,)
    assert fs.pre.dtype == np.float16 and fs.pre.shape == (7, v.transformer.width)
    np.testing.assert_allclose(fs.global_norm, raw.norm(dim=-1).numpy(), rtol=1e-6)  # float32, exact
    np.testing.assert_allclose(fs.global_.astype(np.float32) * fs.global_norm[:, None], raw.numpy(),
                               rtol=0, atol=2e-3 * float(raw.norm(dim=-1).max()))  # float16 unit rows
    pre = torch.from_numpy(fs.pre.astype(np.float32))
    torch.testing.assert_close(pre @ v.proj, raw, atol=3e-3 * float(raw.abs().max()), rtol=0)
    # and what is not the raw embedding fails: the unit rows alone are off by the norm
    assert not np.allclose(fs.global_.astype(np.float32), raw.numpy(), atol=1e-2)


def test_old_format_cache_is_refused_in_one_line(tiny_clip, tmp_path):
    "A format-1 cache (no norms, no pre-projection features) is refused before any work, saying how to re-extract."
    data = Rows(4)
    fs = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=4)
    meta = json.loads((fs.folder / "meta.json").read_text())
    arrays = {k: v for k, v in meta["arrays"].items() if k not in ("global_norm", "pre")}
    (fs.folder / "meta.json").write_text(json.dumps(meta | dict(format_version=1, arrays=arrays)))
    for k in ("global_norm", "pre"): (fs.folder / f"{k}.npy").unlink()
    for call in (lambda: open_features(fs.folder), lambda: extract_features(tiny_clip, data, tmp_path, "toy")):
        with pytest.raises(SpaError) as e: call()
        assert "\n" not in str(e.value) and "format_version 1, not 2" in str(e.value)
        assert "delete that folder and rerun to re-extract (refresh=True in Python)" in str(e.value)
    assert data.reads == 4  # refused before reading a row
    assert extract_features(tiny_clip, data, tmp_path, "toy", refresh=True).pre is not None


def test_truncated_array_is_rejected(tiny_clip, tmp_path):
    fs = extract_features(tiny_clip, Rows(5), tmp_path, "toy", batch_size=4)
    path = fs.folder / "patches.npy"
    del fs
    with open(path, "r+b") as fh: fh.truncate(fh.seek(0, 2) - 64)
    with pytest.raises(SpaError, match="truncated.*refresh=True"): extract_features(tiny_clip, Rows(5), tmp_path, "toy")


def test_precision_and_device_key_the_cache(tiny_clip, tiny_clip_file, tmp_path):
    "float32 (the protocol's) by default; an autocast precision runs as such and never shares a cache with float32."
    fp32 = extract_features(tiny_clip, Rows(5), tmp_path, "toy", batch_size=4)
    assert (fp32.meta["precision"], fp32.meta["device"]) == ("fp32", "cpu")
    amp = extract_features(load_clip(TINY_ARCH, tiny_clip_file, precision="amp_bf16"), Rows(5), tmp_path, "toy", batch_size=4)
    assert amp.folder != fp32.folder and amp.meta["precision"] == "amp_bf16"
    assert not np.array_equal(amp.global_, fp32.global_)  # bf16 autocast did run
    np.testing.assert_allclose(amp.global_.astype(np.float32), fp32.global_.astype(np.float32), atol=5e-2)


def test_tf32_is_float32_weights_with_a_cache_of_its_own(tiny_clip, tiny_clip_file, tmp_path):
    "precision='tf32' loads float32 weights; its features (CPU: TF32 does not apply) equal fp32's, in another cache."
    import spa_toolkit.backbone as B
    fp32 = extract_features(tiny_clip, Rows(5), tmp_path, "toy", batch_size=4)
    tf32 = extract_features(load_clip(TINY_ARCH, tiny_clip_file, precision="tf32"), Rows(5), tmp_path, "toy", batch_size=4)
    assert tf32.folder != fp32.folder and tf32.meta["precision"] == "tf32"
    np.testing.assert_array_equal(tf32.global_, fp32.global_)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with B._tf32(True): assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with B._tf32(False): assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # restored


def test_the_device_transform_extracts_the_same_features_into_a_cache_of_its_own(tiny_clip, tmp_path):
    "transform_on='device': pixels to the device, resized there; features as the PIL path's, another cache."
    data = Rows(7)
    for r, im in zip(data.rows, tiny_images(7, size=20, seed=3)): r["image"] = im  # 20 px, resized to 32
    host = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=3)
    dev = extract_features(tiny_clip, data, tmp_path, "toy", batch_size=3, transform_on="device")
    assert dev.folder != host.folder and dev.meta["transform_on"] == "device" and "transform_on" not in host.meta
    cos = (host.global_.astype(np.float32) * dev.global_.astype(np.float32)).sum(-1)
    assert cos.min() > 0.999, cos
    # the pixels themselves: within about one uint8 step after normalising (0.014 here); a bilinear resize
    # is 0.29 away, a nearest one 2.1, while both keep the features' cosine above 0.999
    ims = [r["image"] for r in data.rows]
    pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in ims])
    want = torch.stack([tiny_clip.preprocess(im) for im in ims])
    assert (device_transform(tiny_clip, pixels) - want).abs().max() < 0.03
    np.testing.assert_array_equal(dev.labels, host.labels)
    mixed = Rows(4)
    mixed.rows[1]["image"] = tiny_images(1, size=24, seed=5)[0]
    with pytest.raises(SpaError, match="differ in size.*transform_on='host'"):
        extract_features(tiny_clip, mixed, tmp_path / "m", "toy", batch_size=4, transform_on="device")
    with pytest.raises(SpaError, match="transform_on='gpu'"):
        extract_features(tiny_clip, data, tmp_path, "toy", transform_on="gpu")


def test_interrupted_extraction_resumes_to_identical_arrays(tiny_clip, tmp_path):
    whole = extract_features(tiny_clip, Rows(11), tmp_path / "a", "toy", batch_size=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_features(tiny_clip, Rows(11, fail_at=7), tmp_path / "b", "toy", batch_size=3, record_every=1)
    folder = tmp_path / "b" / whole.folder.name
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["n_done"], meta["complete"]) == (6, False)  # two finished batches of 3
    with pytest.raises(SpaError, match="unfinished"): open_features(folder)
    data = Rows(11)
    resumed = extract_features(tiny_clip, data, tmp_path / "b", "toy", batch_size=3)
    assert data.reads == 5  # rows 6..10 only
    for k in ("global_", "patches", "labels"):
        np.testing.assert_array_equal(getattr(resumed, k), getattr(whole, k))


def test_a_failed_background_write_surfaces_and_records_only_what_was_written(tiny_clip, tmp_path, monkeypatch):
    "The writer thread's error reaches the caller; the progress record never counts a batch that was not written."
    import spa_toolkit.backbone as B
    whole = extract_features(tiny_clip, Rows(11), tmp_path / "a", "toy", batch_size=3)
    real, calls = B._write_rows, []
    def flaky(arrays, i, batch, copied):
        calls.append(i)
        if i == 6: raise OSError("disk full (simulated)")
        real(arrays, i, batch, copied)
    monkeypatch.setattr(B, "_write_rows", flaky)
    with pytest.raises(OSError, match="disk full"):
        extract_features(tiny_clip, Rows(11), tmp_path / "b", "toy", batch_size=3, record_every=1)
    meta = json.loads((tmp_path / "b" / whole.folder.name / "meta.json").read_text())
    assert meta["n_done"] == 6 and calls[:3] == [0, 3, 6]  # rows 0..5 written and recorded, the third write failed
    monkeypatch.setattr(B, "_write_rows", real)
    resumed = extract_features(tiny_clip, Rows(11), tmp_path / "b", "toy", batch_size=3)
    for k in ("global_", "patches", "labels", "global_norm"):
        np.testing.assert_array_equal(getattr(resumed, k), getattr(whole, k))


def test_parallel_decoding_gives_the_same_features(tiny_clip, tmp_path):
    rows = Rows(6).rows
    one = extract_features(tiny_clip, rows, tmp_path / "a", "toy", batch_size=3)
    two = extract_features(tiny_clip, rows, tmp_path / "b", "toy", batch_size=3, num_workers=2)
    np.testing.assert_array_equal(one.patches, two.patches)


def test_bad_inputs(tiny_clip, tmp_path):
    with pytest.raises(SpaError, match="empty"): extract_features(tiny_clip, [], tmp_path, "toy")
    with pytest.raises(SpaError, match="no feature cache"): open_features(tmp_path)
    with pytest.raises(SpaError, match="use one of"): encode_images(tiny_clip, torch.zeros(1, 3, 32, 32), patch_source="keys")
    with pytest.raises(SpaError, match="wrap it in a list"): encode_texts(tiny_clip, "a cat")


def test_one_model_loaded_two_ways_shares_its_feature_cache(tiny_clip_dir, tmp_path):
    data = Rows(5)
    first = extract_features(load_clip(pretrained=tiny_clip_dir), data, tmp_path, "toy", batch_size=4)
    again = extract_features(load_clip(f"{LOCAL_DIR}{tiny_clip_dir}"), data, tmp_path, "toy", batch_size=4)
    assert again.folder == first.folder and data.reads == 5  # the second load reads no image



def test_value_path_is_the_last_block_with_self_only_attention(tiny_clip, tiny_images):
    "MaskCLIP's value path = open_clip's own last block run with an attention mask that lets each token see only itself."
    x = batch(tiny_clip, tiny_images[:3])
    v, seen = tiny_clip.model.visual, {}
    hook = v.transformer.resblocks[-1].register_forward_hook(lambda m, args, out: seen.setdefault("input", args[0]))
    try: tiny_clip.model.encode_image(x)
    finally: hook.remove()
    h = seen["input"]  # [B, L, w] what the last block receives (batch first in open_clip 3)
    L = h.shape[1]
    self_only = torch.full((L, L), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad(): out = v.transformer.resblocks[-1](h, attn_mask=self_only)
    expected = l2norm(v.ln_post(out[:, 1:]) @ v.proj)  # patch tokens: every token but [CLS]
    torch.testing.assert_close(encode_images(tiny_clip, x, patch_source="value").patches, expected, atol=1e-5, rtol=1e-5)
