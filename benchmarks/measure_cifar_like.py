"""Measure candidate micro-CLIPs for the cifar_like world before any continual-learning run, and write the candidates file.

For each model folder: zero-shot top-1 on the world's 100 unseen classes, the premise on siblings (`parts_premise_views`),
and the similarity statistics (`clip_stats`), on `cifar_like_world(n_train=10, n_test=5, seed=0)` (a smaller draw than the
benchmark's 100/10 per class, for the 2-core machine). The choice rule is in `nbs/05a_microclip.ipynb`.

`--render base` draws that world as pretraining draws its images (`world.BASE_RENDER`) instead of the benchmark's harder
`DEMO_RENDER` (the fifth round of `nbs/05a_microclip.ipynb`).

Usage: python benchmarks/measure_cifar_like.py --candidate NAME=POOL:RATE:FOLDER ... --json PATH [--render base]
"""
import argparse, json
from pathlib import Path

import torch

from spa_toolkit.backbone import LOCAL_DIR, load_clip
from spa_toolkit.microclip import clip_stats, parts_premise_views, zero_shot_top1
from spa_toolkit.world import BASE_RENDER, cifar_like_world


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidate", action="append", required=True, help="NAME=POOL:RATE:FOLDER")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", choices=["base"], help="the world drawn as pretraining draws (default: the benchmark's)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    render = {} if a.render is None else dict(BASE_RENDER)
    world, out = cifar_like_world(n_train=10, n_test=5, seed=0, **render), {}
    for c in a.candidate:
        name, _, rest = c.partition("="); pool, rate, folder = rest.split(":", 2)
        clip = load_clip(f"{LOCAL_DIR}{Path(folder).resolve()}", None)
        zs = zero_shot_top1(clip, world.test["image"], world.test["label"], world.class_names, world.templates)
        pv, st = parts_premise_views(clip, world), clip_stats(clip, world)
        out[name] = dict(pool_type=pool, mark_caption_rate=float(rate), zero_shot=zs, chance=1 / world.n_classes,
                         premise_global=pv.global_view, premise_patch=pv.patch_view, premise_views=pv._asdict(), **st._asdict())
        print(name, json.dumps(out[name]), flush=True)
    drawn = "" if a.render is None else ", BASE_RENDER's noise, distractors and similarity"
    a.json.write_text(json.dumps(dict(world=f"cifar_like_world(n_train=10, n_test=5, seed=0{drawn})", candidates=out),
                                 indent=1) + "\n")


if __name__ == "__main__":
    main()
