"""Peak memory of one SPA training step at CIFAR-100 shapes, with many descriptions per class (issue 15's memory target).

The step: the last task of a B0Inc10-like run at ViT-B/16 shapes — batch 64, 100 seen classes (90 old ones replayed from
their Gaussians), 196 patches, d = 512 — trained for one batch. Each class has `--descriptions` phrases (ENGINE's files pool
~500 per class on CIFAR-100); `n_desc` caps how many become semantic tokens. Features and text embeddings are random unit
vectors (memory does not depend on their values). Every configuration runs in a fresh process; its peak resident memory
during the step (Linux VmHWM, reset just before the step) minus the memory held before it is the step's extra peak.
Target: with 500 descriptions and the default cap, <= 2 GB extra and <= 1.2x the peak with 8 descriptions.

Usage: python benchmarks/bench_memory.py [--threads 1] [--descriptions 500]
"""
import argparse, json, subprocess, sys
from pathlib import Path

import numpy as np
import torch

from spa_toolkit.backbone import FeatureSet
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.base import SpaKnobs
from spa_toolkit.learner import new_state, train_task
from spa_toolkit.method import TextSide
from spa_toolkit.patches import semantic_tokens

B, C, OLD, N, D = 64, 100, 90, 196, 512


def status_kb(field: str) -> int:
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))


def step_peak(n_phrases: int, knobs: dict) -> dict:
    "Extra peak memory (MB) of the measured training step, in this process."
    g = make_generator(0)
    rnd = lambda *s: l2norm(torch.randn(*s, generator=g))
    names = [f"class {c}" for c in range(C)]
    table = {}  # a fixed random embedding per distinct prompt, as a text encoder would give
    encode = lambda texts: torch.stack([table.setdefault(t, rnd(D)) for t in texts])
    sem = semantic_tokens(names, {n: [f"phrase {i} of {n}" for i in range(n_phrases)] for n in names}, encode,
                          n_desc=SpaKnobs(**knobs).n_desc)
    text = TextSide(rnd(C, D), sem.tokens, sem.mask)
    labels = np.concatenate([np.repeat(np.arange(OLD), 2), np.resize(np.arange(OLD, C), B)])
    n = len(labels)
    feats = FeatureSet(rnd(n, D).numpy().astype(np.float16), rnd(n, N, D).numpy().astype(np.float16), None, labels, Path("."), {})
    state = train_task(new_state(text, 100.0, knobs=SpaKnobs(**(knobs | dict(epochs=0)))), feats, list(range(OLD)), g)  # old classes: statistics only
    state.knobs = SpaKnobs(**(knobs | dict(epochs=1, batch_size=B)))
    before = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    train_task(state, feats, list(range(OLD, C)), g)
    return dict(extra_mb=(status_kb("VmHWM") - before) / 1024, tokens_per_class=int(sem.mask.sum(1).max()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--descriptions", type=int, default=500)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) and print its result
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.one:
        cfg = json.loads(a.one)
        print(json.dumps(step_peak(cfg["phrases"], cfg["knobs"])))
        return
    configs = [("8 descriptions, default knobs", 8, {}), (f"{a.descriptions} descriptions, default knobs", a.descriptions, {}),
               (f"{a.descriptions} descriptions, selection=class", a.descriptions, dict(selection="class")),
               (f"{a.descriptions} descriptions, no cap (n_desc=None)", a.descriptions, dict(n_desc=None))]
    out = {}
    for name, phrases, knobs in configs:
        cmd = [sys.executable, __file__, "--threads", str(a.threads), "--one", json.dumps(dict(phrases=phrases, knobs=knobs))]
        out[name] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"{name:45s} semantic tokens per class {out[name]['tokens_per_class']:4d}   extra peak {out[name]['extra_mb']:8.1f} MB", flush=True)
    base, capped = out[configs[0][0]]["extra_mb"], out[configs[1][0]]["extra_mb"]
    ok = capped <= 2048 and capped <= 1.2 * base
    print(f"[target] {a.descriptions} descriptions with the default cap: {capped:.0f} MB extra (<= 2048), {capped / base:.2f}x the peak with 8 "
          f"(<= 1.2x) -> {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
