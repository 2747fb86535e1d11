"""CPU scale probe: SPA over 1,000 classes in 100 tasks, time and memory per task as the classes grow.

Random unit global features (and a small patch grid) stand in for cached features: speed and memory do not depend on their
values. Per task: training seconds, the pseudo-features it replayed, training microseconds per scored (image, class) pair,
evaluation seconds (the seen classes' test images against every seen class: quadratic, so also shown per image x class), the
bytes of the stored statistics and the process's peak memory. The probe fits a line to the training cost of the tasks up to
100 classes and reports the last task's cost against its extrapolation (target, issue 20: within 2x).

A task's training cost is (its real images + its pseudo-features) x the seen classes. Its real images are a fixed number; its
pseudo-features are `learner.pseudo_per_batch` per batch: one per real image (pseudo_ratio 1), but room for every old class once
an epoch. So the cost grows linearly with the classes while a task's real images outnumber the old classes, and quadratically
once the old classes outnumber them (the probe prints where that crossover lies). Run it at two numbers of train images per
class, all else equal: `--per-class 10` (100 real images a task: quadratic from 130 old classes on) and `--per-class 100`
(1,000 a task, as in every real benchmark: CIFAR-100 has 500 per class, ImageNet-1k about 1,300; linear up to 1,024 old classes).
Then it shows which covariance models the statistics of 1,000 classes at ViT-B/16 sizes (d = 512, 16 patch slots) allow in
this machine's memory and in a 24 GiB GPU's, and that the run is refused before any work.
Usage: python benchmarks/bench_scale.py [--classes 1000] [--inc 10] [--per-class 10] [--threads 1] [--json PATH]
"""
import argparse, json, math, resource, time

import numpy as np
import torch

from spa_toolkit.backbone import FeatureSet
from spa_toolkit.calibration import check_stats_memory, run_stats_bytes, stats_budget, stats_bytes
from spa_toolkit.core import SpaError, l2norm, make_generator
from spa_toolkit.base import SpaKnobs
from spa_toolkit.learner import SPA, new_state, pseudo_per_batch, train_task
from spa_toolkit.method import TextSide
from spa_toolkit.protocol import evaluate

def unit(gen: torch.Generator, *shape) -> torch.Tensor: return l2norm(torch.randn(*shape, generator=gen))

def split(gen: torch.Generator, n_classes: int, per_class: int, d: int, n_patches: int) -> FeatureSet:
    "A random in-memory FeatureSet, `per_class` rows per class in label order."
    n = n_classes * per_class
    return FeatureSet(unit(gen, n, d).half().numpy(), unit(gen, n, n_patches, d).half().numpy(), None,
                      np.repeat(np.arange(n_classes), per_class), None, {})

def replay(knobs: SpaKnobs, n_old: int, n_real: int) -> int:
    "Pseudo-features a task with `n_real` images replays for `n_old` old classes over its epochs."
    n_batches = math.ceil(n_real / knobs.batch_size)
    return knobs.epochs * n_batches * pseudo_per_batch(n_old, n_batches, knobs) if n_old else 0

def crossover(knobs: SpaKnobs, n_real: int) -> int:
    "Old classes above which every-old-class coverage sets a task's pseudo-features: ceil(C_old / n_batches) > round(bs * ratio)."
    n_batches = math.ceil(n_real / knobs.batch_size)
    return n_batches * pseudo_per_batch(0, n_batches, knobs)

def probe(a: argparse.Namespace, knobs: SpaKnobs) -> list[dict]:
    "Train and evaluate task by task; one record per task."
    gen = make_generator(0)
    train, test = (split(gen, a.classes, n, a.d, a.patches) for n in (a.per_class, a.test_per_class))
    text = TextSide(unit(gen, a.classes, a.d), unit(gen, a.classes, a.n_desc, a.d), torch.ones(a.classes, a.n_desc, dtype=torch.bool))
    state, out, n_real = new_state(text, 100.0, knobs=knobs), [], a.inc * a.per_class
    for lo in range(0, a.classes, a.inc):
        t0 = time.perf_counter(); train_task(state, train, list(range(lo, lo + a.inc)), gen)
        t1 = time.perf_counter(); evaluate(SPA, state, test)
        t2 = time.perf_counter()
        held = stats_bytes(state.stats) + (stats_bytes(state.pstats) if state.pstats is not None else 0)
        pseudo = replay(knobs, lo, n_real)
        out.append(dict(classes=state.n_seen, train_s=t1 - t0, pseudo=pseudo,
                        train_us_per_pair=1e6 * (t1 - t0) / ((knobs.epochs * n_real + pseudo) * state.n_seen),
                        eval_s=t2 - t1, eval_us_per_image_class=1e6 * (t2 - t1) / (state.n_seen ** 2 * a.test_per_class),
                        stats_mib=held / 2**20, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10))
        if state.n_seen % (a.classes // 10) == 0: print(row(out[-1]), flush=True)
    return out

def row(r: dict) -> str:
    return (f"{r['classes']:>7} {r['train_s']:>9.3f} {r['pseudo']:>7} {r['train_us_per_pair']:>12.3f} {r['eval_s']:>8.3f} "
            f"{r['eval_us_per_image_class']:>12.3f} {r['stats_mib']:>10.2f} {r['peak_rss_mib']:>9.0f}")

def linearity(recs: list[dict], upto: int = 100) -> dict:
    "The last task's training cost against a line fitted to the tasks up to `upto` classes (median of 3 neighbours against noise)."
    c = np.array([r["classes"] for r in recs]); t = np.array([r["train_s"] for r in recs])
    smooth = np.array([np.median(t[max(0, i - 1):i + 2]) for i in range(len(t))])
    slope, icpt = np.polyfit(c[c <= upto], smooth[c <= upto], 1)
    predicted = icpt + slope * c[-1]
    return dict(fit_upto=upto, last_classes=int(c[-1]), last_train_s=float(smooth[-1]), extrapolated_s=float(predicted),
                ratio=float(smooth[-1] / predicted))

def covariance_table(classes: int, d: int = 512, slots: int = 16) -> list[dict]:
    "Bytes of each covariance model's statistics at `classes` classes, and whether they fit here and in a 24 GiB GPU."
    rows = []
    for name, budget in (("this machine", stats_budget("cpu")), ("24 GiB GPU", 12 * 2**30)):
        for cov in ("full", "diag", "shared", "none"):
            try: check_stats_memory(classes, d, cov, slots, budget); msg = "fits"
            except SpaError as e: msg = f"refused: {e}"
            rows.append(dict(where=name, cov=cov, gib=run_stats_bytes(classes, d, cov, slots) / 2**30, verdict=msg))
    return rows

def main(a: argparse.Namespace):
    torch.set_num_threads(a.threads)
    knobs, n_real = SpaKnobs(k_patches=a.k, epochs=a.epochs), a.inc * a.per_class
    cross = crossover(knobs, n_real)
    print(f"SPA, {a.classes} classes in tasks of {a.inc}, d={a.d}, {a.patches} patches (k={a.k}), {a.n_desc} descriptions, "
          f"{a.per_class} train / {a.test_per_class} test images per class, {a.epochs} epoch(s), batch {knobs.batch_size}, "
          f"pseudo_ratio {knobs.pseudo_ratio}, cov={knobs.cov}, pool={knobs.pool}, {a.threads} thread(s)")
    reach = (cross // a.inc + 2) * a.inc  # the first task whose old classes (a multiple of inc) exceed the crossover
    print(f"replay: {n_real} real images a task in {math.ceil(n_real / knobs.batch_size)} batch(es); pseudo-features a task grow with the "
          f"old classes once these exceed {cross}: " + (f"from the task reaching {reach} classes on (quadratic regime)" if reach <= a.classes
                                                         else f"never within {a.classes} classes (linear regime)"))
    print(f"{'classes':>7} {'train s':>9} {'pseudo':>7} {'train us/pair':>12} {'eval s':>8} {'eval us/i*c':>12} {'stats MiB':>10} {'peak MiB':>9}")
    recs = probe(a, knobs)
    lin = linearity(recs) | dict(crossover_old_classes=cross, crossover_task_classes=reach if reach <= a.classes else None)
    print(f"training cost of the task reaching {lin['last_classes']} classes: {lin['last_train_s']:.3f} s, a line fitted up to "
          f"{lin['fit_upto']} classes predicts {lin['extrapolated_s']:.3f} s: ratio {lin['ratio']:.2f} (target <= 2)")
    cov = covariance_table(a.classes)
    for r in cov: print(f"{r['where']:>12}  cov={r['cov']:<6} {r['gib']:8.2f} GiB  {r['verdict']}")
    if a.json: open(a.json, "w").write(json.dumps(dict(args=vars(a), tasks=recs, linearity=lin, covariance=cov), indent=1) + "\n")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000); ap.add_argument("--inc", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=10, help="train images per class")
    ap.add_argument("--test-per-class", type=int, default=2)
    ap.add_argument("--d", type=int, default=128, help="feature width"); ap.add_argument("--patches", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="patches kept per image"); ap.add_argument("--n-desc", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1); ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the records here")
    main(ap.parse_args())
