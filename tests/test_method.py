"""The one method interface: a new method is one module and one registry entry, and then the protocol, its resume and
the command line run it with no other edit."""
import json, sys, textwrap

import numpy as np
import pytest
import torch

import spa_toolkit.base as B
from spa_toolkit.base import SpaError, SpaKnobs
from spa_toolkit.cli import main
from spa_toolkit.method import get_method, load_state, method_knobs, method_name, save_state
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.protocol import Prepared, prepare, run_method, run_methods
from spa_toolkit.world import synthetic_world

TOY = """
"A toy method: a nearest class mean whose means drift towards their class-name embedding by a knob."
from __future__ import annotations  # knobs read their annotations as text
from dataclasses import dataclass
from typing import ClassVar
import torch
from spa_toolkit.base import Knobs
from spa_toolkit.core import l2norm
from spa_toolkit.method import Method, task_span

@dataclass(frozen=True)
class ToyKnobs(Knobs):
    peer: ClassVar[str] = "toy"
    pull: float = 0.5 # weight of the class-name embedding in a class's prototype
    epochs: int = 7 # a field SPA's knobs have too: the toy's own value must stay its own

@dataclass
class ToyState:
    knobs: ToyKnobs
    names: torch.Tensor # [C, d]
    protos: torch.Tensor # [n_seen, d]
    n_seen: int = 0
    @property
    def device(self): return self.names.device

def train(state, task, gen):
    lo, hi = task_span(task.classes, state.n_seen)
    g, y = task.read(task.rows)
    means = torch.stack([g[y == c].mean(0) for c in range(lo, hi)])
    state.protos = torch.cat([state.protos, l2norm(means + state.knobs.pull * state.names[lo:hi])])
    state.n_seen = hi
    return state

TOY = Method(
    knobs=ToyKnobs,
    new=lambda text, scale, seed, knobs: ToyState(knobs, text.names, text.names[:0], 0),
    train=train,
    logits=lambda state: lambda r: r.g @ state.protos.T,
    to_dict=lambda s: dict(knobs=s.knobs.to_dict(), names=s.names, protos=s.protos, n_seen=s.n_seen),
    from_dict=lambda d, device: ToyState(ToyKnobs.from_dict(d["knobs"]), d["names"].to(device),
                                         d["protos"].to(device), d["n_seen"]))
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    "The toy method's module on the path and its one registry entry."
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(B.REGISTRY, "toy", ("toy_method:TOY", {}))
    monkeypatch.setitem(B.REGISTRY, "toy_far", ("toy_method:TOY", dict(pull=2.0)))  # a setting, as spa_global is
    yield
    sys.modules.pop("toy_method", None)


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    world = synthetic_world(n_classes=8, n_train=8, n_test=4, inc=4)
    return prepare(world, load_embedded_clip(), cache_dir=tmp_path_factory.mktemp("features"), progress=False)


def test_a_new_method_runs_through_the_protocol_and_resumes(toy, prep, tmp_path):
    assert method_knobs("toy", SpaKnobs(epochs=1)).epochs == 7  # shares nothing it does not declare
    assert method_knobs("toy_far").pull == 2.0
    res = run_methods(prep, ["toy", "toy_far", "ncm"], out_dir=tmp_path / "a", progress=False)
    assert all(len(r.curve) == len(prep.splits) and r.average > 100 / 8 for r in res.values()), res
    assert res["toy"].curve != res["toy_far"].curve  # the setting reaches the method
    half = Prepared(**(vars(prep) | dict(splits=prep.splits[:1])))
    run_method(half, "toy", out_dir=tmp_path / "b", progress=False)
    (tmp_path / "b" / "toy.json").unlink()  # killed during its second task: a state after the first, no result
    state, extra = load_state(tmp_path / "b" / "toy.state.pt")
    assert state.n_seen == 4 and len(extra["records"]) == 1
    resumed = run_method(prep, "toy", out_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.curve == res["toy"].curve and resumed.run_key == res["toy"].run_key


def test_a_new_method_runs_from_the_command_line(toy, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--methods", "toy,ncm", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| toy | synthetic | B0Inc4 | 6 |" in printed, printed
    saved = json.loads((out / "toy.json").read_text())
    assert saved["knobs"] == {"pull": 0.5, "epochs": 7, "peer": "toy"}
    assert main(args + ["--resume"]) == 0  # finished: read back
    assert json.loads((out / "toy.json").read_text())["curve"] == saved["curve"]


def test_registry_errors_name_the_fix(toy):
    with pytest.raises(SpaError, match="choose from spa,"): get_method("toy2")
    with pytest.raises(SpaError, match="toy takes ToyKnobs or the run's SpaKnobs, not ProofKnobs"):
        method_knobs("toy", get_method("proof").knobs())
    with pytest.raises(SpaError, match="add it to base.REGISTRY"): method_name(object.__new__(type("X", (), {})))


def test_a_state_file_names_its_method(prep, tmp_path):
    st = get_method("rapf").new(prep.text, prep.logit_scale, 0, method_knobs("rapf"))
    save_state(st, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["method"] == "rapf"
    d = torch.load(tmp_path / "s.pt", weights_only=True) | dict(method="gone")
    torch.save(d, tmp_path / "t.pt")
    with pytest.raises(SpaError, match="names no registered method"): load_state(tmp_path / "t.pt")
