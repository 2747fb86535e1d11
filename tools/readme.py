"""Render nbs/index.ipynb to README.md (what `nbdev_readme` does, without Quarto).

nbdev 2's `nbdev_readme` renders through Quarto, whose PyPI package downloads its binary at build time and so cannot be
installed from a package registry alone. This renders the same notebook with the standard library: markdown cells as
they are, code cells fenced, their printed (stdout) output fenced below them, `#|` directive lines and `#| hide` cells dropped;
`#| echo: false` drops a cell's code and `#| output: asis` puts its output in as markdown (as Quarto does).
The outputs are those saved in the notebook: `python tools/readme.py --execute` runs it first (`tools/notebooks.py --write`).
Usage: `python tools/readme.py` writes README.md; `python tools/readme.py --check` fails when README.md is stale.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def directives(lines):
    "A code cell's `#|` directives, spaces removed: {'hide', 'echo:false', 'output:asis', ...}."
    return {l[2:].replace(" ", "") for l in lines if l.startswith("#|")}

def cell_markdown(cell):
    """The markdown a cell contributes to the README ('' for hidden cells). As Quarto renders nbdev notebooks,
    `#| echo: false` leaves the code out and `#| output: asis` puts the printed output in as markdown."""
    src = "".join(cell["source"])
    if cell["cell_type"] == "markdown": return src
    lines = src.splitlines()
    flags = directives(lines)
    if "hide" in flags: return ""
    code = "\n".join(l for l in lines if not l.startswith("#|")).strip()
    outs = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("name") == "stdout")
    shown = "" if "echo:false" in flags else f"```python\n{code}\n```"
    printed = "" if not outs.strip() else outs.rstrip() if "output:asis" in flags else f"```\n{outs.rstrip()}\n```"
    return "\n\n".join(p for p in (shown, printed) if p)

def render(nb_path=root/"nbs"/"index.ipynb"):
    "README text rendered from the index notebook."
    cells = json.loads(Path(nb_path).read_text())["cells"]
    parts = [cell_markdown(c) for c in cells if not "".join(c["source"]).startswith("#| default_exp")]
    return "\n\n".join(p for p in parts if p.strip()) + "\n"

def execute(nb_path=root/"nbs"/"index.ipynb"):
    "Run the notebook as the notebook tool does (tools/notebooks.py) and save its outputs."
    sys.path.insert(0, str(root/"tools"))
    from notebooks import main
    if main(["--write", str(nb_path)]): sys.exit(f"{nb_path} failed to run")

if __name__ == "__main__":
    if "--execute" in sys.argv: execute()
    text, readme = render(), root/"README.md"
    if "--check" in sys.argv:
        if readme.read_text() != text: sys.exit("README.md is out of date with nbs/index.ipynb: run `python tools/readme.py`")
    else: readme.write_text(text)
