"ProjectorBank / SpaProjectors: identity start, freezing, growth, state round trips, no global RNG, bad inputs."
import io, os
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True"); os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest, torch
from spa_toolkit.core import SpaError, l2norm, make_generator
from spa_toolkit.projectors import ProjectorBank, SpaProjectors

SHAPES = [(6, 32), (6, 4, 32), (2, 3, 4, 32)]  # global [B,d], patches [B,k,d], per-class patches [B,C,k,d]

def perturb(module, scale=0.2):
    "Pretend `module` was trained: move every parameter."
    with torch.no_grad():
        for p in module.parameters(): p.add_(scale * torch.randn_like(p))

@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
def test_new_bank_is_identity(shape):
    x = torch.randn(shape)
    bank = ProjectorBank(32).add_task(make_generator(0))
    torch.testing.assert_close(bank(x), l2norm(x), rtol=0, atol=0)

@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
def test_add_task_to_trained_bank_changes_nothing(shape):
    x, bank = torch.randn(shape), ProjectorBank(32, n_tasks=2)
    perturb(bank)
    before = bank(x)
    assert not torch.allclose(before, l2norm(x))
    bank.add_task()
    assert torch.equal(bank(x), before)

def train_steps(bank, x, steps=3):
    opt = torch.optim.SGD(bank.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05)
    target = torch.randn(x.shape[-1], 5)
    for _ in range(steps):
        opt.zero_grad(); (bank(x) @ target).square().mean().backward(); opt.step()

def test_freeze_old_freezes_all_but_newest():
    bank, x = ProjectorBank(32, n_tasks=3), torch.randn(16, 32)
    perturb(bank)
    old = [[p.detach().clone() for p in a.parameters()] for a in bank.adapters]
    newest = bank.freeze_old()
    assert {id(p) for p in newest} == {id(p) for p in bank.adapters[-1].parameters()}
    train_steps(bank, x)
    for a, before in zip(bank.adapters[:-1], old[:-1]):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert any(not torch.equal(p, q) for p, q in zip(bank.adapters[-1].parameters(), old[-1]))

def test_freeze_then_grow_then_freeze_again():
    bank = ProjectorBank(8).add_task()
    bank.freeze_old(); bank.add_task(); bank.freeze_old()
    assert [p.requires_grad for a in bank.adapters for p in a.parameters()] == [False] * 4 + [True] * 4

def test_spa_projectors_freeze_both_banks():
    proj = SpaProjectors(32, n_tasks=2)
    perturb(proj)
    params = proj.freeze_old()
    assert len(params) == 8
    assert not any(p.requires_grad for b in (proj.visual, proj.text) for p in b.adapters[0].parameters())

def roundtrip(obj):
    buf = io.BytesIO(); torch.save(obj.state_dict(), buf); buf.seek(0)
    return torch.load(buf, weights_only=True)

@torch.no_grad()
def test_state_dict_round_trip_bank():
    bank = ProjectorBank(32, hidden=7, n_tasks=3, dtype=torch.float64)
    perturb(bank)
    back = ProjectorBank.from_state_dict(roundtrip(bank))
    assert (back.n_tasks, back.dim, back.hidden) == (3, 32, 7)
    for shape in SHAPES:
        x = torch.randn(shape, dtype=torch.float64)
        assert torch.equal(back(x), bank(x))
    back.add_task()                                   # a reloaded bank keeps growing on its dtype
    assert back.adapters[-1].fc1.weight.dtype == torch.float64

@torch.no_grad()
def test_state_dict_round_trip_spa_projectors():
    proj = SpaProjectors(32, n_tasks=2)
    perturb(proj)
    back = SpaProjectors.from_state_dict(roundtrip(proj))
    x = torch.randn(3, 5, 32)
    assert torch.equal(back.visual(x), proj.visual(x)) and torch.equal(back.text(x), proj.text(x))
    with pytest.raises(SpaError, match="pass dim="): SpaProjectors.from_state_dict({})

def test_init_leaves_global_rng_alone_and_is_reproducible():
    state = torch.random.get_rng_state()
    a, b = ProjectorBank(16, n_tasks=2, seed=3), ProjectorBank(16, n_tasks=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.adapters[0].fc1.weight, a.adapters[1].fc1.weight)
    assert not torch.equal(a.adapters[0].fc1.weight, ProjectorBank(16, n_tasks=1, seed=4).adapters[0].fc1.weight)

def test_new_adapters_follow_the_bank_dtype():
    bank = ProjectorBank(16).to(torch.float64).add_task()
    assert bank.adapters[0].fc1.weight.dtype == torch.float64
    assert bank(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64

def test_bad_inputs():
    with pytest.raises(SpaError, match="width 8"): ProjectorBank(16)(torch.randn(2, 8))
    with pytest.raises(SpaError, match="add_task"): ProjectorBank(16).freeze_old()
    with pytest.raises(SpaError, match=">= 1"): ProjectorBank(0)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bank_grows_on_cuda():
    bank = ProjectorBank(16, device="cuda").add_task()
    x = torch.randn(4, 16, device="cuda")
    assert bank.adapters[0].fc1.weight.device.type == "cuda"
    torch.testing.assert_close(bank(x), l2norm(x))
    bank.add_task(make_generator(0, "cuda"))
    assert bank.adapters[1].fc2.weight.device.type == "cuda"


def test_bank_inputs_are_checked():
    import numpy as np
    from spa_toolkit.core import SpaError
    bank = ProjectorBank(8).add_task()
    with pytest.raises(SpaError, match="must be a torch tensor, got ndarray"): bank(np.ones((2, 8), dtype=np.float32))
    with pytest.raises(SpaError, match=r"float32 weights but got torch.float64 features: pass x.to"): bank(torch.ones(2, 8, dtype=torch.float64))
    with pytest.raises(SpaError, match=r"got int: pass make_generator\(seed\)"): bank.add_task(generator=3)
