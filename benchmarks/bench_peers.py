"""The peers in SPA's loop: accuracy over 3 seeds on the default synthetic world, train time relative to SPA's, and each peer's
cost per task on CIFAR-shaped random features on the CPU.

Part 1 runs `run_protocol` on `synthetic_world(seed=s)` with the embedded micro-CLIP for s = 0, 1, 2 (world seed = run seed) and
prints each method's Avg / Last (mean ± std) and its training time over SPA's. Part 2 trains each peer, with its published epochs,
on random unit features of CIFAR-100's shape (100 classes, 10 tasks, d = 512); `--per-class` below 500 shrinks the training set
and the time is extrapolated linearly in images (every epoch visits each image once). RAPF's pseudo-features do not grow with the
images; PROOF's memory (at most 2000 images) is already all of a small class's images, so its extrapolation after task 1 is an
upper bound.
Usage: python benchmarks/bench_peers.py [--seeds 0 1 2] [--per-class 50] [--tasks 2] [--threads 1]
"""
import argparse, tempfile, time
from pathlib import Path

import numpy as np
import torch

from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.world import synthetic_world
from spa_toolkit.learner import PEERS, method_knobs, run_protocol
from spa_toolkit.microclip import load_embedded_clip

METHODS = ["spa", "simplecil", "zs_clip", "proof", "rapf"]

def synthetic(seeds: list[int]):
    "Avg / Last over seeds and train time relative to SPA's, on the default synthetic world."
    clip, work = load_embedded_clip(), Path(tempfile.mkdtemp())
    runs = [run_protocol(synthetic_world(seed=s), clip, methods=METHODS, seed=s, cache_dir=work, progress=False) for s in seeds]
    print(f"default synthetic world, seeds {seeds}\n| method | Avg | Last | train time / SPA's |\n|---|---|---|---|")
    spa_t = np.mean([r["spa"].timings["train_s"] for r in runs])
    for m in METHODS:
        a, l = (np.array([getattr(r[m], k) for r in runs]) for k in ("average", "last"))
        t = np.mean([r[m].timings["train_s"] for r in runs])
        print(f"| {m} | {a.mean():.2f} ± {a.std():.2f} | {l.mean():.2f} ± {l.std():.2f} | {t / spa_t:.2f} |")

def cifar_shaped(per_class: int, tasks: int, d: int = 512, n_classes: int = 100, inc: int = 10):
    "Seconds per task of each peer on random CIFAR-shaped features, measured on `tasks` tasks and extrapolated to 500 per class."
    g = make_generator(0)
    feats = l2norm(torch.randn(n_classes * per_class, d, generator=g))
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    names = l2norm(torch.randn(n_classes, d, generator=g))
    read = lambda r: (feats[torch.as_tensor(r)], labels[torch.as_tensor(r)])
    scale = 500 / per_class
    print(f"\nCIFAR-shaped random features: {n_classes} classes, {per_class} train images per class (CIFAR: 500), d = {d}, "
          f"tasks of {inc}, CPU, {torch.get_num_threads()} thread(s)\n| peer | epochs | task | measured s | extrapolated to 500/class, s |\n|---|---|---|---|---|")
    for name, peer in PEERS.items():
        k = method_knobs(name)
        state, gen = peer.new(names, 100.0, 0, k), make_generator(0)
        for t in range(tasks):
            cls = list(range(t * inc, (t + 1) * inc))
            rows = np.flatnonzero((labels >= cls[0]).numpy() & (labels <= cls[-1]).numpy())
            t0 = time.perf_counter(); peer.train(state, read, rows, cls, gen); s = time.perf_counter() - t0
            print(f"| {name} | {k['epochs']} | {t + 1} | {s:.1f} | {s * scale:.0f} |")

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    synthetic(a.seeds)
    cifar_shaped(a.per_class, a.tasks)
