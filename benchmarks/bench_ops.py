"""Torch operations dispatched per SPA training step, at task 2 and at task T of a CIFAR-like run (issue 29's target:
<= 300 per step at task 10, and task 10 <= 1.2x task 2). Counted, not timed: every aten call the step makes, as a
`TorchDispatchMode` sees it on the CPU; on a GPU each is (at least) one kernel launch.

How: random unit features with CIFAR-100's class structure (100 classes, tasks of 10, d = 512), each task trained
through `learner.train_task` once with 1 epoch and once with 2 from the same state; the difference is one epoch's
operations (the task's one-off setup cancels), divided by the epoch's steps.

Usage: python benchmarks/bench_ops.py [--tasks 10] [--per-class 20] [--patches 16]
"""
import argparse, copy, math, os
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spa_toolkit.backbone import FeatureSet
from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.learner import new_state, train_task
from spa_toolkit.method import TextSide


class Ops(TorchDispatchMode):
    "Counts every aten operation dispatched inside the `with` block."
    def __init__(self):
        super().__init__(); self.n = Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def world(n_classes: int, per_class: int, n_patches: int, d: int, n_desc: int, seed: int = 0):
    "A random cache and text side with CIFAR-100's shapes."
    g = make_generator(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    centres = l2norm(torch.randn(n_classes, d, generator=g))
    feats = l2norm(centres[labels] + 0.5 * torch.randn(len(labels), d, generator=g))
    patches = l2norm(torch.randn(len(labels), n_patches, d, generator=g)).half().numpy()
    train = FeatureSet(feats.half().numpy(), patches, None, labels.numpy(), None, {})
    sem = l2norm(torch.randn(n_classes, n_desc, d, generator=g))
    return train, TextSide(centres, sem, torch.ones(n_classes, n_desc, dtype=torch.bool))


def ops_per_step(state, train, classes: list[int], knobs: SpaKnobs, per_task: int) -> tuple[float, Counter]:
    "Operations of one epoch of the task (2 epochs minus 1 from the same state), per step."
    counts = []
    for epochs in (1, 2):
        s = copy.deepcopy(state); s.knobs = knobs.replace(epochs=epochs)
        with Ops() as ops: train_task(s, train, classes, make_generator(1))
        counts.append(ops.n)
    steps = math.ceil(per_task / knobs.batch_size)
    return (sum(counts[1].values()) - sum(counts[0].values())) / steps, counts[1] - counts[0]


def main(tasks: int, per_class: int, n_patches: int, d: int = 512, inc: int = 10, n_desc: int = 8,
         quiet: bool = False) -> dict[int, float]:
    "Operations per step at task 2 and at the last task ({task: ops}); printed as a table unless `quiet`."
    torch.set_num_threads(1)
    train, text = world(tasks * inc, per_class, n_patches, d, n_desc)
    knobs = SpaKnobs()
    state = new_state(text, 100.0, 0, knobs.replace(epochs=1))
    rows = []
    for t in range(tasks):
        classes = list(range(t * inc, (t + 1) * inc))
        if t + 1 in (2, tasks):
            per, by = ops_per_step(state, train, classes, knobs, inc * per_class)
            rows.append((t + 1, per, by))
        train_task(state, train, classes, make_generator(t))  # advance: one epoch is enough to grow the bank
    if quiet: return {t: per for t, per, _ in rows}
    print(f"SPA, default knobs, {tasks * inc} classes in tasks of {inc}, {per_class} images a class, d = {d}, "
          f"{n_patches} patch tokens, batch {knobs.batch_size}\n| task | adapters | ops per step |\n|---|---|---|")
    for t, per, _ in rows: print(f"| {t} | {t} | {per:.0f} |")
    (t2, p2, _), (tT, pT, byT) = rows[0], rows[-1]
    print(f"\ntask {tT} / task {t2}: {pT / p2:.2f}x (target <= 1.2x); task {tT}: {pT:.0f} ops per step (target <= 300)")
    print("most frequent at task", tT, ":", ", ".join(f"{k} {v / math.ceil(inc * per_class / knobs.batch_size):.0f}"
                                                    for k, v in byT.most_common(8)))
    return {t: per for t, per, _ in rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--patches", type=int, default=16)
    a = ap.parse_args()
    main(a.tasks, a.per_class, a.patches)
