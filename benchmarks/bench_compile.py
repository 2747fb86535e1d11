"""SPA's training step eager and compiled (`SpaKnobs(compile_step=True)`: fixed shapes, `torch.compile` once a task) on
this machine's CPU, at task 2 and task T of a CIFAR-like run: seconds per step and the compile's one-off cost per task.

How: bench_ops.py's random cache with CIFAR-100's class structure (100 classes in tasks of 10, d = 512); at each measured
task, the same state trains the task with 1 and with 2 epochs, eager and compiled; the 2-minus-1 difference is one epoch
(setup and compile cancel), divided by its steps; a task's compile is its first compiled 1-epoch run minus a later one
(dynamo's cache hit). Best of --repeats. On CUDA the compiled step runs as CUDA graphs ("reduce-overhead"), which this
script does not measure (no GPU here): on a CPU it shows what inductor's fusion alone is worth and what a compile costs.

A first compile on a machine: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 (otherwise inductor reuses what an earlier run compiled).

Usage: python benchmarks/bench_compile.py [--tasks 10] [--per-class 50] [--repeats 3]
"""
import argparse, copy, importlib.util, math, os, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import make_generator
import spa_toolkit.learner as learner
from spa_toolkit.learner import new_state, train_task

_spec = importlib.util.spec_from_file_location("bench_ops", Path(__file__).with_name("bench_ops.py"))
bench_ops = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(bench_ops)


def seconds(state, train, classes, knobs: SpaKnobs, repeats: int) -> tuple[float, float]:
    "(best 1-epoch time, best 2-epoch time) of the task from `state` with `knobs`."
    best = []
    for epochs in (1, 2):
        ts = []
        for _ in range(repeats):
            s = copy.deepcopy(state); s.knobs = knobs.replace(epochs=epochs)
            t0 = time.perf_counter(); train_task(s, train, classes, make_generator(1)); ts.append(time.perf_counter() - t0)
        best.append(min(ts))
    return best[0], best[1]


def main(tasks: int, per_class: int, repeats: int, n_patches: int = 16, d: int = 512, inc: int = 10):
    torch.set_num_threads(1)
    # the learner compiles a copy of the step per task; here the repeats of one task share the first run's compile
    learner._own_copy = lambda f: f
    train, text = bench_ops.world(tasks * inc, per_class, n_patches, d, 8)
    knobs = SpaKnobs()
    steps = math.ceil(inc * per_class / knobs.batch_size)
    state = new_state(text, 100.0, 0, knobs.replace(epochs=1))
    print(f"SPA, default knobs, {tasks * inc} classes in tasks of {inc}, {per_class} images a class ({steps} steps an "
          f"epoch, batch {knobs.batch_size}), d = {d}, {n_patches} patch tokens, one CPU thread, best of {repeats}\n"
          "| task | eager s/step | compiled s/step | compiled / eager | compile s (once a task) |\n|---|---|---|---|---|")
    for t in range(tasks):
        classes = list(range(t * inc, (t + 1) * inc))
        if t + 1 in (2, tasks):
            e1, e2 = seconds(state, train, classes, knobs, repeats)
            # the first compiled call compiles: time it apart, so the repeats below hit dynamo's cache
            s = copy.deepcopy(state); s.knobs = knobs.replace(epochs=1, compile_step=True)
            t0 = time.perf_counter(); train_task(s, train, classes, make_generator(1)); first = time.perf_counter() - t0
            c1, c2 = seconds(state, train, classes, knobs.replace(compile_step=True), repeats)
            eager, compiled = (e2 - e1) / steps, (c2 - c1) / steps
            print(f"| {t + 1} | {eager:.4f} | {compiled:.4f} | {compiled / eager:.2f} | {first - c1:.1f} |")
        train_task(state, train, classes, make_generator(t))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    main(a.tasks, a.per_class, a.repeats)
