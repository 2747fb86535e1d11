"""CPU scale probe: SPA over 1,000 classes in 100 tasks, time and memory per task as the classes grow.

Random unit global features (and a small patch grid) stand in for cached features: speed and memory do not depend on their
values. Per task: training seconds (its images are a fixed number, each scored against every seen class, so the cost should
grow linearly with the seen classes), evaluation seconds (the seen classes' test images against every seen class: quadratic,
so it is also shown per image x class), the bytes of the stored statistics and the process's peak memory. The probe fits a
line to the training cost of the tasks up to 100 classes and reports the last task's cost against its extrapolation
(target, issue 20: within 2x). Then it shows which covariance models the statistics of 1,000 classes at ViT-B/16 sizes
(d = 512, 16 patch slots) allow in this machine's memory and in a 24 GiB GPU's, and that the run is refused before any work.
Usage: python benchmarks/bench_scale.py [--classes 1000] [--inc 10] [--threads 1] [--json PATH]
"""
import argparse, json, resource, time

import numpy as np
import torch

from spa_toolkit.backbone import FeatureSet
from spa_toolkit.calibration import check_stats_memory, run_stats_bytes, stats_budget, stats_bytes
from spa_toolkit.core import SpaError, l2norm, make_generator
from spa_toolkit.base import SpaKnobs
from spa_toolkit.learner import TextSide, evaluate, new_state, train_task

def unit(gen: torch.Generator, *shape) -> torch.Tensor: return l2norm(torch.randn(*shape, generator=gen))

def split(gen: torch.Generator, n_classes: int, per_class: int, d: int, n_patches: int) -> FeatureSet:
    "A random in-memory FeatureSet, `per_class` rows per class in label order."
    n = n_classes * per_class
    return FeatureSet(unit(gen, n, d).half().numpy(), unit(gen, n, n_patches, d).half().numpy(), None,
                      np.repeat(np.arange(n_classes), per_class), None, {})

def probe(a: argparse.Namespace) -> list[dict]:
    "Train and evaluate task by task; one record per task."
    gen = make_generator(0)
    train, test = (split(gen, a.classes, n, a.d, a.patches) for n in (a.per_class, a.test_per_class))
    text = TextSide(unit(gen, a.classes, a.d), unit(gen, a.classes, a.n_desc, a.d), torch.ones(a.classes, a.n_desc, dtype=torch.bool))
    state, out = new_state(text, 100.0, knobs=SpaKnobs(k_patches=a.k, epochs=a.epochs)), []
    for lo in range(0, a.classes, a.inc):
        t0 = time.perf_counter(); train_task(state, train, list(range(lo, lo + a.inc)), gen)
        t1 = time.perf_counter(); evaluate(state, test)
        t2 = time.perf_counter()
        held = stats_bytes(state.stats) + (stats_bytes(state.pstats) if state.pstats is not None else 0)
        out.append(dict(classes=state.n_seen, train_s=t1 - t0, eval_s=t2 - t1, eval_us_per_image_class=1e6 * (t2 - t1) / (state.n_seen ** 2 * a.test_per_class),
                        stats_mib=held / 2**20, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10))
        if state.n_seen % (a.classes // 10) == 0: print(row(out[-1]), flush=True)
    return out

def row(r: dict) -> str:
    return (f"{r['classes']:>7} {r['train_s']:>9.3f} {r['eval_s']:>8.3f} {r['eval_us_per_image_class']:>12.3f} "
            f"{r['stats_mib']:>10.2f} {r['peak_rss_mib']:>9.0f}")

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
    print(f"SPA, {a.classes} classes in tasks of {a.inc}, d={a.d}, {a.patches} patches (k={a.k}), {a.per_class} train / "
          f"{a.test_per_class} test images per class, {a.epochs} epoch(s), cov=diag, {a.threads} thread(s)")
    print(f"{'classes':>7} {'train s':>9} {'eval s':>8} {'eval us/i*c':>12} {'stats MiB':>10} {'peak MiB':>9}")
    recs = probe(a)
    lin = linearity(recs)
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
