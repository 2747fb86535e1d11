"""ENGINE with its authors' phrasing of descriptions ("{class} with {description}", the default) against the description
alone ("{s}", what it read before), on a synthetic world: average / last / forgetting per seed (world seed = run seed).

Usage: python benchmarks/engine_phrasing.py [--variant premise|control|cifar_like] [--seeds 0 1 2] [--threads 1]
"""
import argparse, tempfile

import torch

from spa_toolkit.catalog import DEFAULT_WORLD, WORLD_VARIANTS
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.peers.engine import ENGINE_SEM_TEMPLATE, EngineKnobs
from spa_toolkit.protocol import prepare, run_method, texts_needed
from spa_toolkit.world import synthetic_world

PHRASINGS = {"authors": ENGINE_SEM_TEMPLATE, "alone": "{s}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=list(WORLD_VARIANTS), default=DEFAULT_WORLD)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clip, knobs = load_embedded_clip(variant=a.variant), {p: EngineKnobs(sem_template=t) for p, t in PHRASINGS.items()}
    print("| seed | phrasing | Avg | Last | Forgetting |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for s in a.seeds:
            world = synthetic_world(variant=a.variant, seed=s)
            texts = [t for k in knobs.values() for t in texts_needed(["engine"], {"engine": k})]
            prep = prepare(world, clip, cache_dir=cache, progress=False, views=EngineKnobs().cached_views, texts=texts)
            for p, k in knobs.items():
                r = run_method(prep, "engine", seed=s, progress=False, knobs=k)
                print(f"| {s} | {p} ({k.sem_template}) | {r.average:.2f} | {r.last:.2f} | {r.forgetting:.2f} |", flush=True)


if __name__ == "__main__":
    main()
