"The study: paired statistics against scipy, bad input refused before any work, resume that trains nothing, the command."
import json, math, os, subprocess, sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from spa_toolkit import protocol, study
from spa_toolkit.base import SpaError, SpaKnobs
from spa_toolkit.options import RunOptions
from spa_toolkit.study import GRID, ci95, check_seeds, paired_stats, pick_configs, run_study, summary

TINY = dict(n_classes=8, n_train=10, n_test=5)  # two tasks of four classes


def table(per_config: dict[str, list[float]]) -> pd.DataFrame:
    "Records (config, seed, avg, last, forgetting) with `last` and `forgetting` derived from `avg`."
    return pd.DataFrame([dict(config=c, seed=s, avg=a, last=a - 10, forgetting=100 - a)
                         for c, avgs in per_config.items() for s, a in enumerate(avgs)])


def test_paired_difference_is_scipys_paired_t_interval():
    ref, other = [80.0, 82.5, 81.0, 79.0, 84.0], [78.0, 81.0, 77.5, 79.5, 80.0]
    s = paired_stats(table({"spa": ref, "x": other}))
    lo, hi = sps.ttest_rel(other, ref).confidence_interval(0.95)
    assert math.isclose(s.loc["x", "d_avg"], (lo + hi) / 2)
    assert math.isclose(s.loc["x", "d_avg_ci95"], (hi - lo) / 2)
    lo, hi = sps.t.interval(0.95, len(other) - 1, loc=np.mean(other), scale=sps.sem(other))
    assert math.isclose(s.loc["x", "avg"], np.mean(other)) and math.isclose(s.loc["x", "avg_ci95"], (hi - lo) / 2)
    assert s.loc["spa", "d_avg"] == 0 and s.loc["x", "n"] == 5


def test_pairs_follow_seeds_not_row_order():
    df = table({"spa": [80.0, 90.0, 70.0], "x": [81.0, 91.0, 71.0]})
    shuffled = df.sample(frac=1, random_state=0)
    s = paired_stats(shuffled)
    assert math.isclose(s.loc["x", "d_avg"], 1.0) and math.isclose(s.loc["x", "d_avg_ci95"], 0.0, abs_tol=1e-12)


def test_one_seed_shows_a_dash_not_nan():
    t = summary(table({"spa": [80.0], "x": [70.0]}))
    assert t.loc["x", "avg - spa (paired)"] == "-10.00 ± –" and t.loc["spa", "avg"] == "80.00 ± –"
    assert not any("nan" in v for v in t.values.ravel())
    assert math.isnan(ci95([3.0]))


@pytest.mark.parametrize("call, message", [
    (dict(seeds=[]), "no seeds: pass at least one"),
    (dict(seeds=[1, 1]), "repeat: pass each seed once"),
    (dict(seeds=[-2]), "seeds [-2]: pass integers >= 0"),
    (dict(configs={}), "the grid is empty"),
    (dict(configs={"a": ("spa", dict(pooling="max"))}), "configuration 'a': ['pooling'] are not knobs"),
    (dict(configs={"a": ("spa", dict(pool="sum"))}), "pool='sum': choose one of"),
    (dict(configs={"a": ("l2p", {})}), "unknown method(s) ['l2p']"),
    (dict(configs={"ncm": GRID["ncm"]}), "reference 'spa' is not in the grid"),
    (dict(dataset="cifar100", world=TINY), "world= sizes apply to --dataset synthetic"),
])
def test_bad_input_is_refused_before_any_work(monkeypatch, tmp_path, call, message):
    def work(*a, **k): raise AssertionError("work started before the input was checked")
    for name in ("synthetic_world", "open_benchmark", "open_model"): monkeypatch.setattr(study, name, work)
    with pytest.raises(SpaError) as e: run_study(out_dir=tmp_path, **({"seeds": [0]} | call))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


def test_unknown_configuration_names_the_choices():
    with pytest.raises(SpaError, match=r"unknown configuration\(s\) \['pool=sum'\]: choose from spa, spa_global"):
        pick_configs(["spa", "pool=sum"])
    assert check_seeds((3, 1)) == [3, 1] and list(pick_configs(["ncm", "spa"])) == ["ncm", "spa"]


def test_rerun_trains_nothing_and_changed_knobs_do_not_reuse(monkeypatch, tmp_path):
    trained, task_of = [], protocol.task_of
    monkeypatch.setattr(protocol, "task_of", lambda *a: trained.append(a[1]) or task_of(*a))
    call = dict(configs=pick_configs(["spa", "ncm"]), opts=RunOptions(cache_dir=str(tmp_path / "cache")), world=TINY,
                progress=False, knobs=SpaKnobs(epochs=1))
    first = run_study("synthetic", None, [0, 1], out_dir=tmp_path / "s", **call)
    assert len(trained) == 2 * 2 * 2  # rows x seeds x tasks
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").rglob("*") if p.is_file()}
    trained.clear()
    again = run_study("synthetic", None, [0, 1], out_dir=tmp_path / "s", **call)
    assert trained == []
    assert {p: p.stat().st_mtime_ns for p in saved} == saved
    pd.testing.assert_frame_equal(again.rows, first.rows)
    written = json.loads((tmp_path / "s" / "study.json").read_text())
    assert [(r["config"], r["seed"]) for r in written["rows"]] == [("spa", 0), ("ncm", 0), ("spa", 1), ("ncm", 1)]
    assert written["summary"]["ncm"]["n"] == 2 and written["base"] == {"epochs": 1}
    assert "| ncm | ncm | – |" in (tmp_path / "s" / "study.md").read_text()
    # other knobs under the same names: new run folders, nothing stale reused; an added seed trains only itself
    run_study("synthetic", None, [0, 1, 2], out_dir=tmp_path / "s", **(call | dict(knobs=SpaKnobs(epochs=2))))
    assert len(trained) == 3 * 2 + 1 * 2  # spa on three seeds; ncm ignores epochs: its seeds 0 and 1 are reused ...
    assert len(list((tmp_path / "s" / "runs").iterdir())) == 4 + 4  # ... and spa's got three new folders, ncm's one


@pytest.mark.slow
def test_study_command_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPA_DATA_ROOT"} | dict(
        LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    args = [sys.executable, "-m", "spa_toolkit.cli", "study", "--configs", "spa,spa_global,ncm", "--seeds", "0,1",
            "--epochs", "1", "--out", "out", "--cache-dir", "cache"]
    run = lambda *extra: subprocess.run([*args, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    p = run()
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| spa_global | " in p.stdout and "avg - spa (paired)" in p.stdout and "study written to out" in p.stdout
    md, js = (tmp_path / "out" / "study.md").read_text(), json.loads((tmp_path / "out" / "study.json").read_text())
    assert md in p.stdout and js["seeds"] == [0, 1] and js["setting"] == "B0Inc4"
    assert {r["config"] for r in js["rows"]} == {"spa", "spa_global", "ncm"} and len(js["rows"]) == 6
    runs = sorted((tmp_path / "out" / "runs").iterdir())
    q = run()  # the same command again: the same table, no new run
    assert q.returncode == 0 and q.stdout == p.stdout and sorted((tmp_path / "out" / "runs").iterdir()) == runs
    for extra, needle in [(["--configs", "spa,pool=sum"], "unknown configuration(s) ['pool=sum']: choose from"),
                          (["--seeds", ","], "no seeds: pass at least one, e.g. --seeds 0,1,2"),
                          (["--seeds", "0,x"], "--seeds '0,x': pass comma-separated integers"),
                          (["--reference", "pool=ot"], "reference 'pool=ot' is not in the grid")]:
        e = run(*extra)
        assert e.returncode == 2 and "Traceback" not in e.stderr, e.stderr[-2000:]
        last = e.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last, last
