"The README's promises, checked: its twenty-line example runs on its own, and what it says exists."
import os, re, subprocess, sys
from pathlib import Path

from spa_toolkit.cli import DEFAULT_METHODS
from spa_toolkit.microclip import embedded_clip_path
import pytest

pytestmark = pytest.mark.slow  # subprocesses: the whole module is in the slow set

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_twenty_line_example_runs_on_its_own(tmp_path):
    code = re.search(r"## In twenty lines.*?```python\n(.*?)```", README, re.S)[1]
    env = os.environ | dict(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def test_readme_points_to_the_notebooks_and_defines_its_table():
    assert "`nbs/`" in README and "10a_recipes" in README
    text = " ".join(README.split())
    for m in DEFAULT_METHODS: assert f"`{m}` is" in text or f"`{m}` drops" in text, m
    for metric in ("**Avg**", "**Last**", "**Forgetting**"): assert metric in README
    assert "one seed" in README


def test_stated_model_size_is_measured():
    mb = float(re.search(r"([\d.]+) MB of float16 weights", README)[1])
    size = sum(f.stat().st_size for f in Path(embedded_clip_path()).glob("*.safetensors")) / 1e6
    assert abs(size - mb) < 0.05, (size, mb)


def test_notebooks_cite_nothing_outside_the_repository():
    for nb in (ROOT / "nbs").glob("*.ipynb"):
        assert "../shared/" not in nb.read_text(), nb.name
