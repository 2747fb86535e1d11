"A training step of SPA reads nothing back from its tensors (each read is a host sync on a GPU): inputs are validated once per task."
import collections, functools, math, sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import spa_toolkit.learner as L
import spa_toolkit.protocol as P
from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import make_generator
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.world import synthetic_world

# Calls that read tensor values back to the host; `nonzero`, `unique`, `bincount` (on CUDA), `masked_select` and boolean indexing
# read them to size their output.
READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "__array__",
         "nonzero", "argwhere", "unique", "unique_consecutive", "bincount", "masked_select", "repeat_interleave"}


def _bool_index(idx) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx if isinstance(idx, tuple) else (idx,)))


def _caller() -> str:
    "The innermost spa_toolkit function on the stack (`module.function`), or 'torch' when the read comes from torch itself."
    f = sys._getframe(2)
    while f is not None and "/spa_toolkit/" not in f.f_code.co_filename: f = f.f_back
    return "torch" if f is None else f"{f.f_globals['__name__'].split('.')[-1]}.{f.f_code.co_name}"


class HostReads(TorchFunctionMode):
    "Counts the torch calls that read tensor values back to the host, by the spa_toolkit function making them."
    def __init__(self):
        super().__init__()
        self.by = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name in ("__getitem__", "__setitem__") and _bool_index(args[1])): self.by[_caller()] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_every_kind_of_read():
    x = torch.arange(4.0)
    with HostReads() as reads:
        bool(x.sum() > 0); int(x[1]); float(x[2]); x[0].item(); x.tolist(); [0, 1][x[1].long()]
        x[x > 1]; torch.bincount(x.long()); x.nonzero(); torch.unique(x)
        x + 1; x[1:]; x[torch.tensor([0, 2])]; len(x)  # no read
    assert sum(reads.by.values()) == 10


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    world = synthetic_world(n_classes=8, n_train=40, n_test=2, inc=4)  # 160 images a task: 3 batches of the default 64
    return P.prepare(world, load_embedded_clip(), cache_dir=tmp_path_factory.mktemp("features"), progress=False)


@pytest.mark.parametrize("knobs", [{}, dict(pool="ot"), dict(pool="mean"), dict(selection="class"), dict(cov="full"),
                                   dict(cov="shared"), dict(foreach=True)], ids=str)
def test_a_training_step_reads_nothing_back(prep, monkeypatch, knobs):
    "The second task (calibration replay, patches, default knobs otherwise) reads values back once per epoch: the replay's shapes."
    if knobs.get("foreach"): monkeypatch.setattr(torch.optim, "SGD", functools.partial(torch.optim.SGD, foreach=True))  # CUDA's path
    state = L.new_state(prep.text, prep.logit_scale, knobs=SpaKnobs(**{k: v for k, v in knobs.items() if k != "foreach"}))
    L.train_task(state, prep.train, prep.splits[0], make_generator(0))
    fits, fit = [], L._fit
    def counted(*a, **kw):
        with HostReads() as reads: fit(*a, **kw)
        fits.append(reads.by)
    monkeypatch.setattr(L, "_fit", counted)
    L.train_task(state, prep.train, prep.splits[1], make_generator(1))
    epochs = state.knobs.epochs
    steps = epochs * math.ceil(160 / state.knobs.batch_size)
    [by] = fits
    per_step = (sum(by.values()) - by["learner._replay_counts"]) / steps
    print(f"{knobs or 'default knobs'}: {steps} steps in {epochs} epochs, {per_step:g} reads per step; {dict(by)}")
    assert by == {"learner._replay_counts": epochs}, f"{per_step:g} host reads per step: {dict(by)}"
