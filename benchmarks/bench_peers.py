"""The peers in SPA's loop: accuracy over 3 seeds on the default synthetic world, train time relative to SPA's, and each peer's
cost per task on CIFAR-shaped random features on the CPU.

Part 1 runs `run_protocol` on `synthetic_world(seed=s)` with the embedded micro-CLIP for s = 0, 1, 2 (world seed = run seed) and
prints each method's Avg / Last (mean ± std) and its training time over SPA's. Part 2 trains each peer, with its published epochs,
on random unit features of CIFAR-100's shape (100 classes, 10 tasks, d = 512, 8 random description embeddings per class and
random noisy views, one per epoch, for ENGINE; no patch tokens), and SPA for reference (its default method, with 196 random
patch tokens per image, ViT-B/16's grid);
`--per-class` below 500 shrinks the training set and the time is extrapolated linearly in images (every epoch visits each image
once). RAPF's and ENGINE's pseudo-features are a fixed number per batch, so they grow with the batches as the images do; their
per-task statistics (RAPF's Gaussians, ENGINE's discriminant) do not, which makes the extrapolation a slight upper bound. PROOF's
memory (at most 2000 images) is already all of a small class's images, so its extrapolation after task 1 is a large upper bound.
RanPAC's and FeCAM's cost is statistics, not epochs: RanPAC solves one M x M system per task (M = 10000) whatever the images,
so measure them at CIFAR's own 500 per class (`--per-class 500 --cifar-methods ranpac,fecam`), where nothing is extrapolated.
BOFA trains CLIP's visual.proj on pre-projection features: it gets random ones of ViT-B/16's width (w = 768) and a random
[768, 512] projection; its epochs visit each image once, so it extrapolates linearly (its per-task statistics, a 768 x 768
pseudo-inverse and eigendecomposition, do not grow with the images: a slight upper bound).
CLG-CBM (`--cifar-methods clg_cbm`) trains two stages per task (a concept search, then the bottleneck over the real and
shifted rows, one shifted copy per old class, plus 2 Gaussian rows a batch): its images grow with the tasks, linearly in both.
AREA (`--cifar-methods area`) runs at its authors' CIFAR-100 B0Inc10 settings (exps/area/cifar_0_10.json: 40 epochs, K = 16):
every batch carries 4 Gaussian rows of every old class, so its rows per batch grow with the tasks; its per-task statistics
(one SVD and one covariance per new class) do not grow with the images: a slight upper bound.
Usage: python benchmarks/bench_peers.py [--seeds 0 1 2] [--per-class 50] [--tasks 10] [--threads 1] [--cifar-methods proof,rapf,engine,spa]
       [--skip-synthetic]
"""
import argparse, tempfile, time
from pathlib import Path

import numpy as np
import torch

from spa_toolkit.backbone import FeatureSet
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.world import synthetic_world
from spa_toolkit.learner import new_state, train_task
from spa_toolkit.method import Task, TextSide, get_method, method_knobs
from spa_toolkit.protocol import run_protocol
from spa_toolkit.settings import author_knobs
from spa_toolkit.microclip import load_embedded_clip

METHODS = ["spa", "simplecil", "zs_clip", "proof", "rapf", "engine", "ranpac", "fecam", "bofa", "clg_cbm", "area"]

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

def cifar_shaped(per_class: int, tasks: int, methods: list[str], d: int = 512, n_classes: int = 100, inc: int = 10, n_desc: int = 8,
                 n_patches: int = 196, w: int = 768):
    "Seconds per task of each peer (and SPA) on random CIFAR-shaped features, measured on `tasks` tasks and extrapolated to 500 per class."
    g = make_generator(0)
    feats = l2norm(torch.randn(n_classes * per_class, d, generator=g))
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    pre = torch.randn(n_classes * per_class, w, generator=g)  # BOFA's pre-projection features
    text = TextSide(l2norm(torch.randn(n_classes, d, generator=g)), l2norm(torch.randn(n_classes, n_desc, d, generator=g)),
                    torch.ones(n_classes, n_desc, dtype=torch.bool), None, torch.randn(w, d, generator=g) / w ** 0.5)
    read = lambda r, kind="unit": ((pre if kind == "pre" else feats)[torch.as_tensor(r)], labels[torch.as_tensor(r)])
    scale, totals = 500 / per_class, {}
    print(f"\nCIFAR-shaped random features: {n_classes} classes, {per_class} train images per class (CIFAR: 500), d = {d}, "
          f"tasks of {inc}, CPU, {torch.get_num_threads()} thread(s)\n| method | epochs | task | measured s | extrapolated to 500/class, s |\n|---|---|---|---|---|")
    def timed(name: str, epochs: int, step):
        for t in range(tasks):
            cls = list(range(t * inc, (t + 1) * inc))
            t0 = time.perf_counter(); step(cls); s = time.perf_counter() - t0
            totals.setdefault(name, []).append(s * scale)
            print(f"| {name} | {epochs} | {t + 1} | {s:.1f} | {s * scale:.0f} |", flush=True)
    for name in (m for m in methods if m != "spa"):
        peer, k = get_method(name), method_knobs(name)
        if name == "area": k = author_knobs("area", "cifar100", "B0Inc10").knobs  # its CIFAR epochs and K
        state, gen = peer.new(text, 100.0, 0, k), make_generator(0)
        read_views = None
        if k.cached_views:  # ENGINE's noisy views, random like the features
            views = l2norm(torch.randn(len(labels), k.cached_views, d, generator=g))
            read_views = lambda r, v: views[torch.as_tensor(r), v]
        rows_of = lambda cls: np.flatnonzero((labels >= cls[0]).numpy() & (labels <= cls[-1]).numpy())
        timed(name, getattr(k, "epochs", 0), lambda cls: peer.train(state, Task(cls, rows_of(cls), None, read, read_views), gen))
    if "spa" not in methods: return summary(totals, tasks)
    patches = l2norm(torch.randn(len(labels), n_patches, d, generator=g)).half().numpy()
    train = FeatureSet(feats.half().numpy(), patches, None, labels.numpy(), None, {})
    spa, gen = new_state(text, 100.0, 0, method_knobs("spa")), make_generator(0)
    timed("spa", spa.knobs.epochs, lambda cls: train_task(spa, train, cls, gen))
    summary(totals, tasks)

def summary(totals: dict, tasks: int):
    print(f"\nmean seconds per task over the {tasks} task(s) measured, extrapolated to 500 images per class:")
    for name, ts in totals.items(): print(f"| {name} | {np.mean(ts):.0f} |")

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cifar-methods", default="proof,rapf,engine,spa", help="methods of part 2, comma-separated")
    ap.add_argument("--skip-synthetic", action="store_true", help="run part 2 only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not a.skip_synthetic: synthetic(a.seeds)
    cifar_shaped(a.per_class, a.tasks, a.cifar_methods.split(","))
