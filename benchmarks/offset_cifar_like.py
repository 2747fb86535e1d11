"""Measure modality-shift candidates for the cifar_like micro-CLIP before any continual-learning run, and write them.

Each candidate is the premise world's micro-CLIP with its image and text embeddings shifted apart by `a` times each tower's
mean raw norm on cifar_like pretraining data, along the directions its embeddings of that data use least
(`microclip.shift_microclip`), measured on `cifar_like_world(n_train=10, n_test=5, seed=0)` as the pretraining
candidates were: zero-shot top-1, the premise on siblings, the similarity statistics, and the mean cosine between class
prompts. The choice rule is in `nbs/05a_microclip.ipynb`.

Usage: python benchmarks/offset_cifar_like.py --json benchmarks/results/microclip_cifar_like_offsets.json [--a 0 0.5 1 ...]
       [--source FOLDER]  (another model to shift, e.g. a candidate written by pretrain_cifar_like.py)
"""
import argparse, json, tempfile
from pathlib import Path

import torch
from spa_toolkit.backbone import LOCAL_DIR, class_embeddings, load_clip
from spa_toolkit.microclip import clip_stats, load_recipe, parts_premise_views, shift_microclip, zero_shot_top1
from spa_toolkit.world import cifar_like_world


def measure(clip, world) -> dict:
    t = class_embeddings(clip, world.class_names, world.templates)
    off = ~torch.eye(len(t), dtype=torch.bool)
    zs = zero_shot_top1(clip, world.test["image"], world.test["label"], world.class_names, world.templates)
    pv = parts_premise_views(clip, world)
    return dict(zero_shot=zs, chance=1 / world.n_classes, premise_global=pv.global_view, premise_patch=pv.patch_view,
                text_text=(t @ t.T)[off].mean().item(), **clip_stats(clip, world)._asdict())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2, 3])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--source", type=Path, help="the model folder to shift (default: the premise world's shipped model)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    world, out = cifar_like_world(n_train=10, n_test=5, seed=0), {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.a:
            folder = shift_microclip(Path(tmp) / f"a{k}", k, **({} if a.source is None else dict(source=a.source)))
            out[str(k)] = load_recipe(folder)["shift"] | measure(load_clip(f"{LOCAL_DIR}{folder}", None), world)
            print(json.dumps(out[str(k)]), flush=True)
    a.json.write_text(json.dumps(dict(world="cifar_like_world(n_train=10, n_test=5, seed=0)", candidates=out), indent=1) + "\n")


if __name__ == "__main__":
    main()
