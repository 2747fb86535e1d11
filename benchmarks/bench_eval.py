"""SPA's evaluation cost per test image as the seen classes grow (issue 29's target: <= 2 ms per test image at 100 seen
classes on one CPU thread), with the running patch relevance (`learner.eval_patch_sets`) against the same evaluation
recomputing every row's relevance over all seen classes (the memo dropped before each evaluation).

How: random unit features with ViT-B/16's shapes (d = 512, 196 patch tokens, 8 descriptions a class), 100 classes in tasks
of 10; SPA trained one epoch a task (training is not what is timed); after each task `protocol.evaluate` scores the test
rows of every seen class, as a run does. Both columns come from the same states in one process, best of `--repeat`.

Usage: python benchmarks/bench_eval.py [--tasks 10] [--test-per-class 20] [--patches 196] [--repeat 3]
"""
import argparse, os, time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

from bench_ops import world
from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import make_generator
from spa_toolkit.learner import SPA, RelevanceMemo, new_state, train_task
from spa_toolkit.protocol import evaluate


def timed(f, repeat: int) -> tuple[float, object]:
    "Best wall time of `repeat` calls of `f` and its last result."
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter(); out = f(); best = min(best, time.perf_counter() - t0)
    return best, out


def main(tasks: int, test_per_class: int, n_patches: int, repeat: int, inc: int = 10, d: int = 512) -> list[dict]:
    "Per evaluation: seen classes, test rows, ms per test row with and without the memo (printed as a table)."
    torch.set_num_threads(1)
    n = tasks * inc
    train, text = world(n, 20, n_patches, d, 8)
    test, _ = world(n, test_per_class, n_patches, d, 8, seed=1)
    state, out, memo = new_state(text, 100.0, 0, SpaKnobs(epochs=1)), [], None
    print(f"SPA evaluation, {n} classes in tasks of {inc}, {test_per_class} test images a class, d = {d}, "
          f"{n_patches} patch tokens, one thread\n| task | seen classes | test rows | ms / row, running relevance "
          "| ms / row, recomputed | same predictions |\n|---|---|---|---|---|---|")
    for t in range(tasks):
        train_task(state, train, list(range(t * inc, (t + 1) * inc)), make_generator(t))
        rows_n = state.n_seen * test_per_class
        def fresh():
            state.memo = None
            return evaluate(SPA, state, test)

        def running():  # continues from the previous evaluation's memo, copied so every repeat does the same work
            state.memo = None if memo is None else RelevanceMemo(test, memo.rel.clone(), memo.covered.clone())
            return evaluate(SPA, state, test)

        t_fresh, (p_fresh, _) = timed(fresh, repeat)
        t_run, (p_run, _) = timed(running, repeat)
        memo = state.memo  # the memo after this task's evaluation is what the next evaluation continues from
        row = dict(task=t + 1, seen=state.n_seen, rows=rows_n, ms_running=1e3 * t_run / rows_n,
                   ms_fresh=1e3 * t_fresh / rows_n, same=bool((p_fresh == p_run).all()))
        out.append(row)
        print(f"| {row['task']} | {row['seen']} | {rows_n} | {row['ms_running']:.2f} | {row['ms_fresh']:.2f} | "
              f"{row['same']} |")
    last = out[-1]
    print(f"\nat {last['seen']} seen classes: {last['ms_running']:.2f} ms per test image with the running relevance "
          f"(target <= 2), {last['ms_fresh']:.2f} recomputed; predictions identical at every task: "
          f"{all(r['same'] for r in out)}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--patches", type=int, default=196)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    main(a.tasks, a.test_per_class, a.patches, a.repeat)
