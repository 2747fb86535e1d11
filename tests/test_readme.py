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


def test_readme_shows_the_settings_each_peer_of_bench_runs():
    "The table `bench`'s last column will show on the suite, as markdown (not fenced), from the code that makes it."
    from spa_toolkit.runs import settings_table
    table = settings_table(["proof", "engine", "rapf", "ranpac", "fecam", "bofa", "clg_cbm", "area"])
    assert table in README and f"```\n{table}" not in README
    assert "| cub | B0Inc20 | authors: exps/cub.json |" in table and "| our settings |" not in table


def test_readme_tool_drops_code_and_puts_output_in_as_quarto_does():
    sys.path.insert(0, str(ROOT / "tools"))
    from readme import cell_markdown
    cell = lambda *flags: dict(cell_type="code", source=[*(f"#| {f}\n" for f in flags), "print('| a |')"],
                               outputs=[dict(name="stdout", text=["| a |\n"])])
    assert cell_markdown(cell()) == "```python\nprint('| a |')\n```\n\n```\n| a |\n```"
    assert cell_markdown(cell("echo: false", "output: asis")) == "| a |"
    assert cell_markdown(cell("output: asis")) == "```python\nprint('| a |')\n```\n\n| a |"
    assert cell_markdown(cell("hide")) == ""
