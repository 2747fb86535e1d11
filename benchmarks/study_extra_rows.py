"""Rows outside `study.GRID`, on the study's protocol (both shape worlds, run seed = world seed), printed as its paired tables.

Used to ask whether any setting of SPA's existing knobs lets it reach SimpleCIL + 1 on the control world without losing on
the premise world (issue 28's target), on dev seeds only; `benchmarks/results/study_extra_rows.md` holds the answer.
Usage: python benchmarks/study_extra_rows.py --seeds 0,1,2,3,4 --rows '{"proto=2": {"proto": 2.0}}' [--cache DIR]
"""
import argparse, json, os, tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

from spa_toolkit.study import GRID, markdown, run_grid, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", required=True, help="comma-separated world and run seeds")
    ap.add_argument("--rows", required=True, help="JSON: row name -> SpaKnobs overrides of SPA's defaults")
    ap.add_argument("--cache", default=None, help="feature cache folder (default: a temporary one)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    configs = {"spa": GRID["spa"], **{r: ("spa", o) for r, o in json.loads(a.rows).items()},
               "spa_global": GRID["spa_global"], "ncm": GRID["ncm"]}
    seeds = [int(s) for s in a.seeds.split(",")]
    cache = Path(a.cache or tempfile.mkdtemp())
    df = run_grid(["premise", "control"], seeds, configs, cache, processes=2)
    for v in ("premise", "control"): print(f"\n### {v} world, seeds {seeds}\n\n" + markdown(summary(df[df.world == v])))


if __name__ == "__main__":
    main()
