"tools/notebooks.py on throwaway notebooks: stale outputs fail, current ones pass, volatile and flagged cells are left alone."
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "notebooks.py"
sys.path.insert(0, str(ROOT / "tools"))
import notebooks  # noqa: E402
from pct2nb import to_notebook  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses: the whole module is in the slow set


def tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


def write(path, *cells):
    "A notebook of code cells at `path` (cell ids fixed by position)."
    path.write_text(json.dumps(to_notebook([("code", c) for c in cells], path.stem), indent=1) + "\n")
    return path


def outputs(path): return [c["outputs"] for c in json.loads(path.read_text())["cells"]]


def text(outs): return "".join("".join(o.get("text", [])) for o in outs)


@pytest.fixture
def nb(tmp_path):
    return write(tmp_path / "tiny.ipynb", 'print("x =", 1 + 1)', "#| volatile\nimport time; print(time.time())",
                 '#| slow\nprint("slow ran")', "#| eval: false\nraise SystemExit")


def test_write_then_check_passes_and_file_is_nbdev_clean_stable(nb):
    r = tool("--write", nb)
    assert r.returncode == 0, r.stderr
    outs = outputs(nb)
    assert text(outs[0]) == "x = 2\n" and text(outs[1]) and outs[2] == [] and outs[3] == []
    before = nb.read_text()
    assert before.endswith("}\n") and json.dumps(json.loads(before), indent=1, sort_keys=True, ensure_ascii=False) + "\n" == before
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(nb)], cwd=ROOT, check=True)
    assert nb.read_text() == before
    r = tool("--check", nb)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stale_output_fails_and_names_the_cell(nb):
    tool("--write", nb)
    d = json.loads(nb.read_text())
    d["cells"][0]["outputs"][0]["text"] = ["x = 3\n"]
    nb.write_text(json.dumps(d))
    r = tool("--check", nb)
    assert r.returncode == 1
    cid = d["cells"][0]["id"]
    assert f"STALE {nb} cell {cid}: print(\"x =\", 1 + 1)" in r.stdout and "-x = 3" in r.stdout and "+x = 2" in r.stdout


def test_volatile_changes_are_ignored_and_flagged_cells_keep_their_output(nb):
    d = json.loads(nb.read_text())
    d["cells"][2]["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["printed on a GPU box\n"]}]
    nb.write_text(json.dumps(d))
    tool("--write", nb)
    assert text(outputs(nb)[2]) == "printed on a GPU box\n"  # not run: keeps what it had
    assert tool("--check", nb).returncode == 0  # the time printed by the volatile cell changed, and is not compared
    r = tool("--write", "--flags", "slow", nb)
    assert r.returncode == 0, r.stderr
    slow = outputs(nb)[2]
    assert text(slow[:1]).startswith("[last run ") and " CPU cores, " in text(slow[:1]) and text(slow[1:]) == "slow ran\n"
    assert tool("--check", nb).returncode == 0 and tool("--check", "--flags", "slow", nb).returncode == 0


def test_error_fails_and_nothing_is_written(tmp_path):
    nb = write(tmp_path / "err.ipynb", 'print("before")', "1 / 0")
    before = nb.read_text()
    for mode in ("--write", "--check"):
        r = tool(mode, nb)
        assert r.returncode == 1 and "ZeroDivisionError" in r.stderr and "FAIL" in r.stderr
    assert nb.read_text() == before


def test_cleared_output_is_stale(tmp_path):
    "A cell that stopped printing is stale too (execnb keeps old outputs when a cell prints nothing; the tool does not)."
    nb = write(tmp_path / "quiet.ipynb", "x = 1")
    d = json.loads(nb.read_text())
    d["cells"][0]["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["old\n"]}]
    nb.write_text(json.dumps(d))
    assert tool("--check", nb).returncode == 1
    assert tool("--write", nb).returncode == 0 and outputs(nb) == [[]]


def test_each_notebook_runs_in_a_fresh_process(tmp_path):
    a = write(tmp_path / "a.ipynb", "import json; json.mark = 1")
    b = write(tmp_path / "b.ipynb", "import json; print(hasattr(json, 'mark'))")
    r = tool("--write", "--workers", 1, a, b)
    assert r.returncode == 0, r.stderr
    assert text(outputs(b)[0]) == "False\n"
    assert tool("--check", tmp_path).returncode == 0


def test_stamp_says_where_it_ran(tmp_path, monkeypatch):
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200'\n"); (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    where = notebooks.machine()
    assert ", 1x NVIDIA H200" in where and " CPU cores" in where
    o = notebooks.stamp_output(41.2, where)
    assert notebooks.is_stamp(o) and o["text"][0].endswith(f"on {where}; 41 s]\n")
