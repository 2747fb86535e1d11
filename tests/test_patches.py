"Semantic tokens and semantic-guided patch selection: loop references, chunking, caching and bad inputs."
import pytest
import torch

from spa_toolkit.backbone import encode_texts
from spa_toolkit.core import SpaError, content_key, l2norm
from spa_toolkit.patches import (SEM_TEMPLATE, gather_patches, patch_relevance, select_patches, select_patches_for_labels,
                                 semantic_tokens)


def unit(*shape, seed=0): return l2norm(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))

def naive_select(P, T, m, k):
    "Reference: a loop over images and classes."
    return torch.stack([torch.stack([(P[b] @ T[c][m[c]].T).amax(1).topk(k).indices for c in range(len(T))])
                        for b in range(len(P))])

def random_mask(C, M, seed):
    m = torch.rand(C, M, generator=torch.Generator().manual_seed(seed)) > 0.5
    m[:, 0] = True
    return m


@pytest.mark.parametrize("k", [1, 4, 25])
def test_select_matches_loop_and_chunks(k):
    P, T, m = unit(5, 25, 12, seed=1), unit(11, 6, 12, seed=2), random_mask(11, 6, 3)
    idx = select_patches(P, T, k_patches=k, mask=m)
    assert torch.equal(idx, naive_select(P, T, m, k))
    for chunk in (1, 2, 5, 11, 50):
        assert torch.equal(select_patches(P, T, k_patches=k, mask=m, class_chunk=chunk), idx)
    sub = torch.tensor([10, 0, 4])
    assert torch.equal(select_patches(P, T, k_patches=k, mask=m, classes=sub, class_chunk=2), idx[:, sub])


def test_relevance_is_masked_max():
    P, T, m = unit(3, 10, 8, seed=4), unit(4, 5, 8, seed=5), random_mask(4, 5, 6)
    r = patch_relevance(P, T, m)
    ref = torch.stack([torch.stack([(P[b] @ T[c][m[c]].T).amax(1) for c in range(4)]) for b in range(3)])
    assert torch.allclose(r, ref)


def test_agnostic_selection_uses_all_classes():
    P, T, m = unit(4, 30, 8, seed=7), unit(6, 3, 8, seed=8), random_mask(6, 3, 9)
    idx = select_patches(P, T, k_patches=5, mask=m, agnostic=True)
    ref = naive_select(P, T.flatten(0, 1)[m.flatten()][None], torch.ones(1, int(m.sum()), dtype=torch.bool), 5)
    assert idx.shape == (4, 6, 5) and torch.equal(idx, ref.expand(-1, 6, -1))
    assert torch.equal(select_patches(P, T, k_patches=5, mask=m, agnostic=True, class_chunk=4), idx)


def test_gather_and_label_path():
    P, T, m = unit(4, 20, 8, seed=10).requires_grad_(), unit(5, 4, 8, seed=11), random_mask(5, 4, 12)
    Z = gather_patches(P, select_patches(P, T, k_patches=6, mask=m))
    y = torch.tensor([4, 0, 0, 2])
    Zy = select_patches_for_labels(P, T, y, k_patches=6, mask=m)
    assert Z.shape == (4, 5, 6, 8) and torch.equal(Zy, Z[torch.arange(4), y])
    g, = torch.autograd.grad(Zy.sum(), (P,))
    assert int((g.abs().sum(-1) > 0).sum()) == 4 * 6  # gradient reaches exactly the selected patches


def test_dtype_follows_inputs():
    P, T = unit(2, 10, 8, seed=13).double(), unit(3, 4, 8, seed=14).double()
    assert patch_relevance(P, T).dtype == torch.float64
    assert select_patches_for_labels(P, T, torch.tensor([1, 2]), k_patches=3).dtype == torch.float64


def test_bad_inputs():
    P, T = unit(2, 10, 8, seed=15), unit(3, 4, 8, seed=16)
    cases = [(lambda: select_patches(P, T[..., :6]), "patch dim 8 != semantic token dim 6"),
             (lambda: select_patches(P[0], T), "must be [B, N, d]"),
             (lambda: select_patches(P, T, k_patches=11), "use 1 <= k <= 10"),
             (lambda: select_patches(P, T, k_patches=0), "use 1 <= k <= 10"),
             (lambda: select_patches(P, T, k_patches=2, mask=torch.ones(3, 5, dtype=torch.bool)), "it must be [C, M]"),
             (lambda: select_patches(P, T, k_patches=2, mask=torch.tensor([[1, 0, 0, 0]] * 2 + [[0] * 4], dtype=torch.bool)),
              "class(es) [2] have no valid description"),
             (lambda: select_patches(P, T * float("nan"), k_patches=2), "semantic tokens holds"),
             (lambda: select_patches(P, T, k_patches=2, class_chunk=-1), "positive number of classes"),
             (lambda: select_patches_for_labels(P, T, torch.tensor([0]), k_patches=2), "one label per image"),
             (lambda: select_patches_for_labels(P, T, torch.tensor([0, 3]), k_patches=2), "there are 3 classes")]
    for f, msg in cases:
        with pytest.raises(SpaError) as e: f()
        assert msg in str(e.value), (msg, str(e.value))


class CountingEncoder:
    "A stand-in text encoder: a fixed random unit vector per text; counts the texts it encodes."
    key = "counting-v1"
    def __init__(self): self.texts = []
    def __call__(self, texts):
        self.texts += texts
        return torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(int(content_key(t), 16) % 2**31)) for t in texts])


def test_semantic_tokens_pad_mask_and_cache():
    descs = {"cat": ["ears", "whiskers", "tail", "paws"], "ship": ["a hull"], "car": ["wheels", "doors"]}
    enc, cache = CountingEncoder(), {}
    st = semantic_tokens(["cat", "ship", "car"], descs, enc, cache=cache)
    assert st.tokens.shape == (3, 4, 16) and st.mask.sum(1).tolist() == [4, 1, 2]
    assert torch.allclose(st.tokens.norm(dim=-1), st.mask.float())
    assert enc.texts[0] == SEM_TEMPLATE.format(c="cat", s="ears") and len(enc.texts) == 7
    again = semantic_tokens(["car", "cat"], descs, enc, cache=cache)
    assert len(enc.texts) == 7 and torch.equal(again.tokens[0, :2], st.tokens[2, :2])
    semantic_tokens(["car"], {"car": ["wheels", "a roof"]}, enc, cache=cache)             # changed descriptions
    semantic_tokens(["car"], descs, enc, template="{c}: {s}", cache=cache)                 # changed template
    semantic_tokens(["car"], descs, enc, cache=cache, key="another-encoder")               # another encoder
    assert len(enc.texts) == 13
    capped = semantic_tokens(["cat", "ship"], descs, enc, n_desc=2)
    assert capped.tokens.shape == (2, 2, 16) and capped.mask.tolist() == [[True, True], [True, False]]


def test_semantic_tokens_errors():
    enc = CountingEncoder()
    with pytest.raises(SpaError, match="class 'dog' has no descriptions"): semantic_tokens(["cat", "dog"], {"cat": ["ears"], "dog": []}, enc)
    with pytest.raises(SpaError, match="template-only"): semantic_tokens(["cow"], {}, enc)
    with pytest.raises(SpaError, match="no class names"): semantic_tokens([], {}, enc)
    with pytest.raises(SpaError, match="pass key="): semantic_tokens(["cat"], {"cat": ["ears"]}, lambda t: torch.ones(len(t), 4), cache={})
    assert enc.texts == []  # nothing was encoded before the errors


def test_semantic_tokens_through_clip_bundle(tiny_clip):
    descs = {"cat": ["whiskers", "a tail"], "ship": ["a hull"]}
    st = semantic_tokens(["cat", "ship"], descs, tiny_clip, cache={})
    ref = encode_texts(tiny_clip, [SEM_TEMPLATE.format(c="ship", s="a hull")])
    assert st.tokens.shape == (2, 2, tiny_clip.embed_dim) and torch.allclose(st.tokens[1, 0], ref[0], atol=1e-5)
