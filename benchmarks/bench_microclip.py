"""The embedded micro-CLIP against the targets of issue 9, every number computed here.

1. Headroom: zero-shot top-1 on the unseen demo classes (`synthetic_world()` test split, drawn with `data.DEMO_RENDER`, harder
   than the pretraining images; class-name prompts) against chance; target >= 3x chance and <= 75%.
2. Local meaning: over demo images, the rank of the patch holding the mark among the N patches by similarity to the image's
   mark phrase ("a small dot mark"), for both patch sources; target: mean rank in the top quarter (chance: the middle).
3. Over seeds (world seed = run seed = s): `run_protocol` with SPA, SPA without the patch/OT branch (spa_global), SPA without
   calibration (spa_nocal), zero-shot and nearest class mean. In the default world every class has marks_per_look - 1 siblings
   that differ from it only in the mark, so the whole benchmark is "classes that differ only in a local part".

Usage: python benchmarks/bench_microclip.py [--seeds 0 1 2] [--threads 1] [--epochs 5] [--model FOLDER]
(--model: another open_clip model folder to measure, e.g. one written by `microclip.save_microclip`; default: the shipped one)
"""
import argparse, tempfile

import numpy as np
import torch

from spa_toolkit.backbone import LOCAL_DIR, PATCH_SOURCES, load_clip
from spa_toolkit.data import synthetic_world
from spa_toolkit.learner import run_protocol
from spa_toolkit.microclip import demo_images, load_embedded_clip, mark_ranks, zero_shot_top1

METHODS = ["spa", "spa_global", "spa_nocal", "zeroshot", "ncm"]


def headroom(clip):
    world = synthetic_world()
    zs = zero_shot_top1(clip, world.test["image"], world.test["label"], world.class_names, world.templates)
    chance = 1 / world.n_classes
    ok = 3 * chance <= zs <= 0.75
    print(f"[headroom] zero-shot top-1 {zs:.1%} = {zs / chance:.2f}x chance ({chance:.2%}) -> {'met' if ok else 'MISSED'}")


def local_meaning(clip, n_per_class):
    demo, n = demo_images(n_per_class, grid=tuple(clip.model.visual.grid_size)), clip.n_patches  # marks on this model's grid
    for src in PATCH_SOURCES:
        rk = mark_ranks(clip, demo, src).float()
        ok = rk.mean() <= n / 4
        print(f"[local] patch_source={src}: mean rank {rk.mean():.2f} of {n} (chance {(n + 1) / 2}, top quarter <= {n / 4:g}), "
              f"median {rk.median():.0f}, in top quarter {(rk <= n / 4).float().mean():.1%} of {len(rk)} images -> {'met' if ok else 'MISSED'}")


def protocol(clip, seeds, epochs):
    res = {m: [] for m in METHODS}
    for s in seeds:
        with tempfile.TemporaryDirectory() as cache:
            out = run_protocol(synthetic_world(seed=s), clip, METHODS, seed=s, cache_dir=cache, progress=False, epochs=epochs)
        for m in METHODS: res[m].append((out[m].average, out[m].last, out[m].forgetting))
        print(f"seed {s}: " + "  ".join(f"{m} avg {out[m].average:.2f} last {out[m].last:.2f} fgt {out[m].forgetting:.2f}" for m in METHODS))
    return {m: np.array(v) for m, v in res.items()}


def summary(res):
    for m, v in res.items():
        mu, sd = v.mean(0), v.std(0)
        print(f"{m:11s} average {mu[0]:6.2f} ± {sd[0]:.2f}   last {mu[1]:6.2f} ± {sd[1]:.2f}   forgetting {mu[2]:6.2f} ± {sd[2]:.2f}")
    cmp = lambda a, b, i, better: [(x > y) if better == "higher" else (x < y) for x, y in zip(res[a][:, i], res[b][:, i])]
    for a, b, i, what, better in [("spa", "spa_global", 0, "average", "higher"), ("spa", "spa_global", 1, "last", "higher"),
                                  ("spa", "zeroshot", 0, "average", "higher"), ("spa", "ncm", 0, "average", "higher"),
                                  ("spa", "spa_nocal", 2, "forgetting", "lower")]:
        wins = cmp(a, b, i, better)
        d = res[a][:, i] - res[b][:, i]
        print(f"[target] {a} vs {b} on {what} ({better} is better): per-seed diff {np.round(d, 2).tolist()}, "
              f"mean {d.mean():+.2f}; {sum(wins)}/{len(wins)} seeds -> {'met' if all(wins) else 'MISSED'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--images-per-class", type=int, default=10)
    ap.add_argument("--model", help="an open_clip model folder (default: the embedded micro-CLIP)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clip = load_clip(f"{LOCAL_DIR}{a.model}", None) if a.model else load_embedded_clip()
    headroom(clip)
    local_meaning(clip, a.images_per_class)
    summary(protocol(clip, a.seeds, a.epochs))


if __name__ == "__main__":
    main()
