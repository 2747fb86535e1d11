"What a new user hit on a clean machine (issue 30): each item pinned by a test that failed on the code before the fix."
import configparser, json, logging, os, re, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from openai_stub import StubOpenAI
from spa_toolkit import cli
from spa_toolkit.base import REGISTRY, SpaError
from spa_toolkit.options import LLM_KEY_ENV, RunOptions, check_api_base

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OFFLINE = dict(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def free_port() -> int:
    "A local port nobody listens on."
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    return port


# 1. --precision is checked where it is parsed, and by load_clip

@pytest.mark.parametrize("bad", ["banana", "fp8"])
def test_unknown_precision_is_refused_before_any_work(bad, capsys, tmp_path):
    with pytest.raises(SpaError, match="--precision"): RunOptions(precision=bad)
    assert cli.main(["run", "--methods", "ncm", "--precision", bad, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose one of fp32" in err and not (tmp_path / "r").exists()
    from spa_toolkit.backbone import load_clip
    with pytest.raises(SpaError, match="precision"): load_clip("ViT-B-16", "no-such-file.pt", precision=bad)


def test_command_line_choices_are_checked_before_torch_is_imported(tmp_path):
    code = ("import sys; from spa_toolkit import cli; rc = cli.main(sys.argv[1:]); print(rc, 'torch' in sys.modules)")
    for args in (["run", "--precision", "banana"], ["describe", "--llm", "m", "--api-base", "localhost:1"],
                 ["run", "--out", "/proc/x"] if Path("/proc").is_dir() else ["run", "--precision", "fp8"]):
        p = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=os.environ | OFFLINE)
        assert p.stdout.split() == ["2", "False"], (args, p.stdout, p.stderr[-500:])
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), (args, p.stderr)


# 2. SPA's own scoring is a function, named in the README and the recipes; float16 patches are accepted

def test_spa_patch_scores_is_the_learners_frozen_score_and_takes_float16():
    from spa_toolkit.ot import patch_ot_scores, pooled_score, spa_patch_scores
    from spa_toolkit.patches import select_patch_sets, toy_world
    P, S = toy_world(n_classes=5, generator=torch.Generator().manual_seed(0))
    Z = select_patch_sets(P, S, 8)
    want = pooled_score(torch.einsum("bkd,cmd->bckm", Z, S), pool="semi_ot")
    torch.testing.assert_close(spa_patch_scores(P, S, k_patches=8, class_chunk=2), want)
    torch.testing.assert_close(spa_patch_scores(P.half(), S, k_patches=8), spa_patch_scores(P.half().float(), S, k_patches=8), rtol=0, atol=0)
    torch.testing.assert_close(patch_ot_scores(P.half(), S, k_patches=8), patch_ot_scores(P.half().float(), S, k_patches=8), rtol=0, atol=0)
    assert "`spa_patch_scores`" in README and "ablation" in README
    assert "spa_patch_scores(" in (ROOT / "nbs" / "10a_recipes.ipynb").read_text()


# 3. the LLM: a key option and variable, a local server without one, the address and the model checked first, replies checked

@pytest.fixture(scope="module")
def server():
    with StubOpenAI() as s: yield s


@pytest.fixture
def stub(server):
    server.reset(); yield server; server.reset()


def auth(stub) -> str:
    return {k.lower(): v for k, v in stub.requests[0]["headers"].items()}["authorization"]


def test_local_server_needs_no_key_and_spa_llm_api_key_is_read(stub, monkeypatch):
    from spa_toolkit.descriptions import describe_run
    for k in ("OPENAI_API_KEY", LLM_KEY_ENV): monkeypatch.delenv(k, raising=False)
    t = time.monotonic()
    res = describe_run(["fox"], None, model="openai/stub", api_base=stub.api_base, max_retries=1, backoff=0.01)
    assert res.descriptions["fox"][0] == "fox trait 0" and len(stub.requests) == 1 and time.monotonic() - t < 30
    stub.reset(); monkeypatch.setenv(LLM_KEY_ENV, "sk-from-spa-env")
    describe_run(["fox"], None, model="openai/stub", api_base=stub.api_base, max_retries=0)
    assert auth(stub) == "Bearer sk-from-spa-env"
    assert cli.build_parser().parse_args(["describe", "--llm", "m", "--api-key", "k"]).api_key == "k"
    assert LLM_KEY_ENV in README and "--api-key" in README


def test_refused_connection_bad_url_and_empty_model_fail_before_any_call(capsys):
    from spa_toolkit.descriptions import describe_run
    t = time.monotonic()
    with pytest.raises(SpaError, match="cannot connect"):
        describe_run(["fox"], None, model="openai/stub", api_base=f"http://127.0.0.1:{free_port()}/v1", api_key="k", backoff=1)
    assert time.monotonic() - t < 10
    with pytest.raises(SpaError, match="not a server URL"): RunOptions(api_base="127.0.0.1:8000/v1")
    with pytest.raises(SpaError, match="is empty"): describe_run(["fox"], None, model=" ", api_key="k")
    with pytest.raises(SpaError, match="names no model"): RunOptions(descriptions="llm:")
    assert cli.main(["describe", "--llm", "", "--k-exemplars", "0"]) == 2
    assert cli.main(["describe", "--llm", "openai/x", "--api-base", f"http://127.0.0.1:{free_port()}/v1"]) == 2
    err = capsys.readouterr().err
    assert "--llm names no model" in err and "cannot connect to 127.0.0.1" in err


def test_short_and_shared_descriptions_are_warned_about(stub, caplog):
    from spa_toolkit.descriptions import describe_run
    stub.reply = lambda c, a: (200, json.dumps({"descriptions": ["striped", "furry", "small", "round"]}))
    with caplog.at_level(logging.WARNING, logger="spa_toolkit.descriptions"):
        describe_run(["fox", "wolf", "bear"], None, model="openai/stub", api_base=stub.api_base, api_key="k", n_descriptions=8)
    text = caplog.text
    assert "3 class(es) got fewer than the 8 descriptions asked" in text and "3 classes share their descriptions" in text
    stub.reset(); caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spa_toolkit.descriptions"):
        describe_run(["fox", "wolf"], None, model="openai/stub", api_base=stub.api_base, api_key="k", n_descriptions=8)
    assert "descriptions" not in caplog.text


# 4. the install: a CPU-only line, and matplotlib where the PNG is promised

def test_cpu_only_install_line_and_matplotlib_in_the_base_install():
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in README
    cfg = configparser.ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini")
    assert any(r.startswith("matplotlib") for r in cfg["DEFAULT"]["requirements"].split())


# 5. the README's first command, run again in the same folder, reports the same finished run

def test_rerunning_the_first_command_reports_the_same_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")} | OFFLINE | dict(HF_HOME=str(tmp_path / "hf"))
    run = lambda: subprocess.run([sys.executable, "-m", "spa_toolkit.cli", "run", "--methods", "ncm,zeroshot"], cwd=tmp_path,
                                 env=env, capture_output=True, text=True, timeout=900)
    first, again = run(), run()
    assert first.returncode == 0, first.stderr[-2000:]
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == first.stdout and "results written to runs/" in again.stdout


# 6. one line, not a traceback: Ctrl-C, an --out that cannot be made, a --pretrained that is not weights

def test_ctrl_c_is_one_line_saying_what_is_kept(monkeypatch, capsys):
    def interrupted(a): raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_run", interrupted)
    try: rc = cli.main(["run", "--methods", "ncm"])
    except KeyboardInterrupt: pytest.fail("Ctrl-C escaped main() as a traceback")
    assert rc == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted:") and err.count("\n") == 1 and "kept" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_out_under_proc_is_refused_before_any_work(capsys):
    assert cli.main(["run", "--methods", "ncm", "--out", "/proc/x"]) == 2
    err = capsys.readouterr().err
    assert "--out /proc/x: cannot" in err and err.count("\n") == 1


def test_pretrained_that_is_not_weights_is_one_line(tmp_path):
    from spa_toolkit.backbone import load_clip
    from spa_toolkit.fixtures import register_tiny_clip
    arch = register_tiny_clip(tmp_path)
    junk = tmp_path / "notes.pt"; junk.write_text("these are not weights\n" * 10)
    with pytest.raises(SpaError) as e: load_clip(arch, junk)
    assert "\n" not in str(e.value) and "is a weights file" in str(e.value)


# 7. offline: random weights from the command line; errors name the flags; the hub hint names HF_HUB_OFFLINE

def test_random_weights_by_name_and_flags_in_errors(tmp_path):
    from spa_toolkit.backbone import RANDOM_WEIGHTS, load_clip
    from spa_toolkit.fixtures import register_tiny_clip
    arch = register_tiny_clip(tmp_path)
    a, b = load_clip(arch, RANDOM_WEIGHTS), load_clip(arch, RANDOM_WEIGHTS)
    assert a.pretrained == "" and a.key == b.key and "'random'" in dict(cli.MODEL_OPTIONS)["--pretrained"]["help"]
    with pytest.raises(SpaError, match="--pretrained random"): load_clip(arch, None)
    from spa_toolkit.catalog import BENCHMARKS
    from spa_toolkit.data import _hub_hint
    hint = _hub_hint(next(b for b in BENCHMARKS if b.hub_id))
    assert "HF_HUB_OFFLINE=1" in hint and "--data-root" in hint and "data_root=" not in hint.replace("data_root= in Python", "")
    assert "HF_HUB_OFFLINE=1" in README


# 8. no refusal where nothing is missing

def test_zero_shot_needs_no_statistics_and_folder_keyed_descriptions_match(tmp_path):
    from spa_toolkit.protocol import run_protocol
    from spa_toolkit.microclip import load_embedded_clip
    from spa_toolkit.patches import sem_prompts
    from spa_toolkit.world import synthetic_world
    world = synthetic_world(n_classes=8, n_train=1, n_test=2)  # one training image per class: no covariance
    res = run_protocol(world, load_embedded_clip(), methods=["zs_clip"], cache_dir=tmp_path / "f", progress=False)
    assert set(res) == {"zs_clip"} and REGISTRY["zs_clip"][1]["cov"] == "none"
    assert sem_prompts("aquarium fish", {"aquarium_fish": ["a silver body"]}) == ["a silver body"]


def test_a_benchmark_without_descriptions_runs_methods_that_read_none():
    from types import SimpleNamespace
    from spa_toolkit.runs import TEMPLATES, descriptions_spec
    bench = SimpleNamespace(name="cifar100", descriptions=None)
    assert descriptions_spec(None, bench, needed=False) == TEMPLATES
    assert descriptions_spec(None, bench, needed=True) is None  # refused later, with the fix named


# 9. library inputs checked or converted at the public functions

def test_library_inputs_checked_or_converted():
    from spa_toolkit.calibration import class_stats
    from spa_toolkit.ot import ot_score, patch_ot_scores
    from spa_toolkit.patches import toy_world
    x, y = torch.randn(10, 4), torch.tensor([0] * 5 + [1] * 5)
    with pytest.raises(SpaError, match="negative class ids"): class_stats(x, y - 1, cov="diag")
    with pytest.raises(SpaError, match="no sample"): class_stats(x[:0], y[:0], cov="diag")
    with pytest.raises(SpaError, match="meta tensor"): class_stats(x.to("meta"), y.to("meta"), cov="diag")
    with pytest.raises(SpaError, match="must be a torch tensor"): class_stats(x, y.numpy(), cov="diag")
    P, S = toy_world(generator=torch.Generator().manual_seed(0))
    Z = P[:, :4]
    torch.testing.assert_close(ot_score(Z.half(), S), ot_score(Z.half().float(), S))
    with pytest.raises(SpaError, match="must be a torch tensor"): ot_score(Z.numpy(), S.numpy())
    for bad, match in ((Z.int(), "floating point"), (Z.to("meta"), "meta tensor"), (Z[:, :0], "at least one patch")):
        with pytest.raises(SpaError, match=match): ot_score(bad, S if bad.device.type != "meta" else S.to("meta"))
    with pytest.raises(SpaError, match="must be a torch tensor"): patch_ot_scores(P.numpy(), S, k_patches=4)
    for bad, sem, match in ((P.int(), S, "floating point"), (P.to("meta"), S.to("meta"), "meta tensor"), (P, S[:0], "no class")):
        with pytest.raises(SpaError, match=match): patch_ot_scores(bad, sem, k_patches=4)
    from spa_toolkit.projectors import ProjectorBank
    bank, x = ProjectorBank(4, n_tasks=1), torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(SpaError, match="ProjectorBank input holds 1 NaN/Inf"): bank(x)
    assert bank(x, check=False).isnan().any()  # a training step's call: no host read, the caller checked its rows


# 10. docs that drifted

def test_readme_table_and_recipes_line_match_the_code():
    assert "`spa_toolkit.core`" in README and "`make_generator`" in README and "`l2norm`" in README
    assert "the projector bank) into" not in README
