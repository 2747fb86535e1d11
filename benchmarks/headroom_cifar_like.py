"""Headroom of the cifar_like world's frozen features, all 100 classes at once (no continual learning): 100-way zero-shot,
nearest class mean (SimpleCIL's last-task classifier) and a linear probe (logistic regression on the unit global features,
its C picked on a fifth of the training images, as CLIP's linear-probe protocol sweeps it on held-out data).
Real CLIP ViT-B/16 (LAION-400M) on CIFAR-100: zero-shot 71.38 and SimpleCIL 76.63 at the last task (published.md), ratio 0.93.
Usage: python benchmarks/headroom_cifar_like.py SEED {base,demo}
"""
import os, sys, tempfile, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from spa_toolkit.core import l2norm
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.protocol import prepare
from spa_toolkit.world import BASE_RENDER, cifar_like_world

C_GRID = [0.1, 1, 10, 100, 1000, 10000]

def unit(fs) -> tuple[torch.Tensor, np.ndarray]:
    return l2norm(torch.from_numpy(np.asarray(fs.global_, dtype=np.float32))), np.asarray(fs.labels)

def main(seed: int, render: str):
    t0, clip = time.time(), load_embedded_clip(variant="cifar_like")
    world = cifar_like_world(seed=seed, **(dict(BASE_RENDER) if render == "base" else {}))
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare(world, clip, cache_dir=tmp, patches="none", progress=False)
        (xtr, ytr), (xte, yte) = unit(prep.train), unit(prep.test)
    n = len(prep.text.names)
    means = l2norm(torch.stack([xtr[torch.from_numpy(ytr == c)].mean(0) for c in range(n)]))
    top1 = lambda w: float(((xte @ w.T).argmax(1).numpy() == yte).mean())
    zs, ncm = top1(prep.text.names), top1(means)
    idx = np.random.default_rng(0).permutation(len(ytr)); fit, val = idx[: len(idx) * 4 // 5], idx[len(idx) * 4 // 5 :]
    score = lambda c: LogisticRegression(C=c, max_iter=3000).fit(xtr[fit].numpy(), ytr[fit]).score(xtr[val].numpy(), ytr[val])
    c = max(C_GRID, key=score)
    lp = LogisticRegression(C=c, max_iter=3000).fit(xtr.numpy(), ytr).score(xte.numpy(), yte)
    print(f"seed {seed}, {render} render: {len(ytr)} train / {len(yte)} test images, {n} classes; zero-shot {zs:.3f}, "
          f"NCM {ncm:.3f}, linear probe {lp:.3f} (C={c}); zero-shot / NCM {zs / ncm:.3f}, NCM / probe {ncm / lp:.3f} "
          f"({time.time() - t0:.0f} s)")

if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), sys.argv[2])
