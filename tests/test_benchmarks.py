"The prepared GPU benchmark (reduced mode) and the scale probe (few classes) run end to end on CPU and write their JSON."
import json, os, subprocess, sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # subprocesses: the whole module is in the slow set

ROOT = Path(__file__).resolve().parent.parent

def test_bench_gpu_smoke_writes_every_measurement(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--device", "cpu", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=os.environ | dict(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(e["precision"], e["transform_on"]) for e in res["extraction"]] == [("fp32", "host"), ("fp32", "device")]
    assert all(e["images_per_s"] > 0 for e in res["extraction"])
    prot, e2e = res["protocol"], res["end_to_end"]
    assert prot["train_s"] > 0 and prot["eval_s"] > 0 and prot["peak_gpu_mib"] is None
    assert len(prot["train_s_per_task"]) == len(prot["eval_s_per_task"]) == 2
    assert abs(sum(prot["train_s_per_task"]) - prot["train_s"]) < 1e-9
    assert set(e2e) == {"cli_defaults", "fastest"} and e2e["cli_defaults"]["precision"] == "fp32"
    assert all(e["total_s"] == e["extract_s"] + e["protocol_s"] and e["images"] == 300 for e in e2e.values())
    assert "SPA protocol  200 train / 100 test, 10 classes, 16 patches, 2 tasks" in p.stdout
    assert "transform (32-px PNG, batch 16)" in p.stdout and "end to end (derived, cli_defaults: fp32" in p.stdout


def test_bench_scale_small_probe_reports_every_task(tmp_path):
    out = tmp_path / "scale.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--classes", "30", "--inc", "10", "--per-class", "4",
                        "--d", "16", "--json", str(out)], capture_output=True, text=True, timeout=300, env=os.environ | dict(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [t["classes"] for t in res["tasks"]] == [10, 20, 30]
    mib = [t["stats_mib"] for t in res["tasks"]]
    assert 0 < mib[0] < mib[1] < mib[2]  # statistics grow with the classes
    assert res["linearity"]["last_classes"] == 30 and res["linearity"]["ratio"] > 0
    assert [t["pseudo"] for t in res["tasks"]] == [0, 64, 64] and res["linearity"]["crossover_old_classes"] == 64  # 40 real images: 1 batch
    gib = {r["cov"]: r["gib"] for r in res["covariance"]}
    assert len(res["covariance"]) == 8 and gib["full"] > gib["diag"] > gib["none"] > 0


def _run(script: str, *args: str) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=300, cwd=ROOT / "benchmarks", env=os.environ | dict(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_bench_eval_small_run_finds_the_same_predictions_at_every_task():
    out = _run("bench_eval.py", "--tasks", "2", "--test-per-class", "2", "--patches", "20", "--repeat", "1")
    assert out.count("| True |") == 2 and "predictions identical at every task: True" in out


def test_bench_task_memory_small_run_reports_the_ratio():
    out = _run("bench_task_memory.py", "--per-class", "20", "--patches", "20")
    assert "the task's rows" in out and "x (target <= 1.5x)" in out
