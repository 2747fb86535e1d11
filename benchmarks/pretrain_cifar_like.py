"""Pretrain one candidate micro-CLIP for the cifar_like world from the recipe family (pooling, mark-caption rate) and write it.

The shipped model's recipe was chosen from the measurements `bench_microclip.py --variant cifar_like --model FOLDER --measure-only`
prints for each candidate (premise gap on siblings, zero-shot headroom, similarity statistics), before any continual-learning run.

`--see-world-classes` pretrains on every look x mark-pair combination, the world's 100 classes included (with pretraining's
own image draws, never the benchmark's): the concepts are seen, as real CLIP saw CIFAR-100's in web images (the fourth
round of `nbs/05a_microclip.ipynb`); by default pretraining sees only the combinations that are not world classes.

`--embed-dim D` gives the joint space D dimensions instead of the variant's 64 (ViT-B/16's is 512), `--text-width W` the
text tower W instead of 64 (the sixth round of `nbs/05a_microclip.ipynb`); the model folder's config records both.

Usage: python benchmarks/pretrain_cifar_like.py --pool tok --rate 0.5 --out FOLDER [--steps 300] [--warmup 100] [--threads 1]
       [--see-world-classes] [--embed-dim D] [--text-width W]
"""
import argparse

import torch

from spa_toolkit import microclip as mc
from spa_toolkit.world import all_parts_combinations


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", choices=["tok", "avg"], required=True)
    ap.add_argument("--rate", type=float, required=True, help="fraction of captions that name the marks")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--see-world-classes", action="store_true", help="pretrain on the world's classes too")
    ap.add_argument("--embed-dim", type=int, help="the joint space's width (default: the variant's, 64)")
    ap.add_argument("--text-width", type=int, help="the text tower's width (default: the variant's, 64)")
    a = ap.parse_args()
    if a.embed_dim or a.text_width:  # new_model and save_microclip read the config from this name
        config = mc.microclip_config
        def wider(variant=mc.DEFAULT_WORLD):
            cfg = config(variant)
            return cfg | {"embed_dim": a.embed_dim or cfg["embed_dim"],
                          "text_cfg": cfg["text_cfg"] | {"width": a.text_width or cfg["text_cfg"]["width"]}}
        mc.microclip_config = wider
    if a.see_world_classes:  # pretrain (and the recipe's record of its classes) read this name from the module
        mc.parts_pretrain_classes = all_parts_combinations
    torch.set_num_threads(a.threads)
    mc.MICROCLIPS["cifar_like"] = mc.MicroSpec(a.pool, a.rate, "microclip_cifar_like")  # the candidate
    knobs = dict(steps=a.steps, seed=0, batch_size=128, lr=2e-3, warmup=a.warmup, weight_decay=0.1, patch_weight=1.0)
    run = mc.pretrain(**knobs, variant="cifar_like", progress=False)
    mc.save_microclip(run, a.out, knobs | dict(variant="cifar_like"))  # pool and rate: in the config and recipe data
    print(f"{a.pool}/{a.rate}: {a.steps} steps in {run.wall_s:.0f} s, last loss {run.losses[-1]:.3f} -> {a.out}")


if __name__ == "__main__":
    main()
