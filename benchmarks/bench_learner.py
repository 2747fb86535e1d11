"""Where a task's training time goes: the model's own maths (torch kernels) versus everything else (Python, data movement).

Trains tasks on cached features and runs the last one under `torch.profiler`: the summed self time of every torch op is the
maths, wall time minus that is everything else (profiler overhead included, so the share is an upper bound). Two workloads: the synthetic world through the tiny CLIP (d=32, 16 patches: kernels are
so small that Python dominates), and random unit features with ViT-B/16 shapes (d=512, 196 patches, 8 descriptions,
10 classes per task, 200 images per class, the default 5 epochs). Target (issue 7): under 10% outside the maths.
Usage: python benchmarks/bench_learner.py [--threads N] [--tasks N]
"""
import argparse, tempfile, time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from spa_toolkit.backbone import FeatureSet, load_clip
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.world import synthetic_world
from spa_toolkit.fixtures import make_tiny_clip
from spa_toolkit.base import SpaKnobs
from spa_toolkit.learner import new_state, train_task
from spa_toolkit.method import TextSide
from spa_toolkit.protocol import prepare

def tiny_world():
    "Cached features of the synthetic world through the tiny CLIP, its text side and splits."
    work = Path(tempfile.mkdtemp())
    clip = load_clip("local-dir:" + str(make_tiny_clip(work)))
    prep = prepare(synthetic_world(), clip, cache_dir=work / "features", progress=False)
    return prep.train, prep.text, prep.splits, clip.logit_scale, {}

def vitb16_shaped(n_classes=30, per_class=200, d=512, n_patches=196, m=8, inc=10):
    "Random unit features with ViT-B/16 shapes, as an in-memory FeatureSet, a random text side and splits."
    g = make_generator(0)
    rnd = lambda *shape: l2norm(torch.randn(*shape, generator=g)).numpy().astype(np.float16)
    n = n_classes * per_class
    feats = FeatureSet(rnd(n, d), rnd(n, n_patches, d), None, np.repeat(np.arange(n_classes), per_class), Path("."), {})
    text = TextSide(torch.from_numpy(rnd(n_classes, d)).float(), torch.from_numpy(rnd(n_classes, m, d)).float(),
                    torch.ones(n_classes, m, dtype=torch.bool))
    return feats, text, [list(range(i, i + inc)) for i in range(0, n_classes, inc)], 100.0, {}

def profile_task(name: str, feats, text, splits, scale: float, knobs: dict, tasks: int):
    "Train `tasks` tasks and print how the last one's time splits."
    state = new_state(text, scale, knobs=SpaKnobs(**knobs))
    for classes in splits[:tasks - 1]: train_task(state, feats, classes)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof: train_task(state, feats, splits[tasks - 1])
    wall = time.perf_counter() - t0
    maths = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    print(f"{name}, task {tasks} (with calibration replay), under torch.profiler: wall {wall:.2f} s; inside torch ops "
          f"{maths:.2f} s; outside {wall - maths:.2f} s = {100 * (wall - maths) / wall:.1f}% of the task (target < 10%)")

def main(threads: int, tasks: int):
    torch.set_num_threads(threads)
    profile_task("synthetic world, tiny CLIP (d=32, N=16)", *tiny_world(), tasks)
    profile_task("ViT-B/16 shapes (d=512, N=196, M=8, 2000 images/task, 5 epochs)", *vitb16_shaped(), tasks)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--tasks", type=int, default=2, help="profile the training of this task (earlier ones train first)")
    main(**vars(ap.parse_args()))
