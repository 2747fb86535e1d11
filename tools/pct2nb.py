"""Write a notebook from a percent-format source: `# %%` starts a code cell, `# %% [md]` a markdown cell.

Usage: python tools/pct2nb.py SRC.py OUT.ipynb   (then run `nbdev_clean`).
A convenience for writing notebooks from an editor; the notebook, not SRC, is what gets committed.
"""
import hashlib, json, sys
from pathlib import Path

def parse_cells(text):
    "Split percent-format `text` into (cell_type, source) pairs."
    cells, kind, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("# %%"):
            if kind: cells.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = ("markdown" if "[md]" in line else "code"), []
        else: lines.append(line)
    if kind: cells.append((kind, "\n".join(lines).strip("\n")))
    return cells

def to_notebook(cells, name=""):
    "A minimal nbformat-4 notebook dict from (cell_type, source) pairs; cell ids are stable per (name, position)."
    def cell(i, kind, src):
        cid = hashlib.sha1(f"{name}-{i}".encode()).hexdigest()[:8]
        c = {"cell_type": kind, "id": cid, "metadata": {}, "source": src.splitlines(keepends=True)}
        return c | ({"execution_count": None, "outputs": []} if kind == "code" else {})
    meta = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    return {"cells": [cell(i, k, s) for i, (k, s) in enumerate(cells)], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}

if __name__ == "__main__":
    src, out = sys.argv[1:3]
    Path(out).write_text(json.dumps(to_notebook(parse_cells(Path(src).read_text()), Path(out).stem), indent=1) + "\n")
