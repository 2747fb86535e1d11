"""Peak memory of one SPA task's training at CIFAR-100 shape, against the size of the task's rows (issue 29's target:
<= 1.5x the rows' own tensors, whatever the dataset's size).

The cache is on disk as `extract_features` writes it (float16 memmaps: global features [n, 512], patch tokens
[n, 196, 512]), two tasks of 10 classes x 500 images; the first task is trained (statistics and adapters), then the
second is measured: `train_task` reads its 5,000 rows (1 GB of patch tokens), checks them, selects the patch sets,
builds the statistics and trains one epoch with replay. A thread samples the process's anonymous resident memory
(RssAnon: what the process itself allocated; the file's pages that the memmap maps are the kernel's page cache, dropped
under pressure) every millisecond; the peak minus the level before the task is the task's extra peak.

Usage: python benchmarks/bench_task_memory.py [--per-class 500] [--patches 196]
"""
import argparse, os, tempfile, threading, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch

from spa_toolkit.backbone import FeatureSet
from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.learner import new_state, train_task
from spa_toolkit.method import TextSide
from bench_memory import status_kb

rss_anon_kb = lambda: status_kb("RssAnon")  # what the process itself allocated, in kB


class Peak:
    "The highest RssAnon seen while the `with` block runs, sampled every millisecond on a thread."
    def __enter__(self):
        self.peak, self.done = rss_anon_kb(), False
        def watch():
            while not self.done: self.peak = max(self.peak, rss_anon_kb()); time.sleep(1e-3)
        self.thread = threading.Thread(target=watch, daemon=True); self.thread.start()
        return self
    def __exit__(self, *exc):
        self.done = True; self.thread.join(); self.peak = max(self.peak, rss_anon_kb())


def disk_cache(folder: Path, n_classes: int, per_class: int, n_patches: int, d: int) -> FeatureSet:
    "A float16 memmap cache of random unit features, written a class at a time (never whole in memory)."
    n, g = n_classes * per_class, make_generator(0)
    glob = np.lib.format.open_memmap(folder / "global.npy", "w+", np.float16, (n, d))
    patches = np.lib.format.open_memmap(folder / "patches.npy", "w+", np.float16, (n, n_patches, d))
    centres = l2norm(torch.randn(n_classes, d, generator=g))
    for c in range(n_classes):
        at = slice(c * per_class, (c + 1) * per_class)
        glob[at] = l2norm(centres[c] + 0.5 * torch.randn(per_class, d, generator=g)).half().numpy()
        patches[at] = l2norm(torch.randn(per_class, n_patches, d, generator=g)).half().numpy()
    glob.flush(); patches.flush(); del glob, patches
    labels = np.repeat(np.arange(n_classes), per_class)
    return FeatureSet(np.load(folder / "global.npy", mmap_mode="r"), np.load(folder / "patches.npy", mmap_mode="r"),
                      None, labels, folder, {})


def main(per_class: int, n_patches: int, d: int = 512, inc: int = 10, n_desc: int = 8):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        feats = disk_cache(Path(tmp), 2 * inc, per_class, n_patches, d)
        g = make_generator(1)
        text = TextSide(l2norm(torch.randn(2 * inc, d, generator=g)), l2norm(torch.randn(2 * inc, n_desc, d, generator=g)),
                        torch.ones(2 * inc, n_desc, dtype=torch.bool))
        state = train_task(new_state(text, 100.0, knobs=SpaKnobs(epochs=1)), feats, list(range(inc)), g)
        n = inc * per_class
        rows_mb = (n * d * 4 + n * n_patches * d * 2 + n * 8) / 2**20  # g float32, patches float16, labels
        before = rss_anon_kb()
        with Peak() as p: train_task(state, feats, list(range(inc, 2 * inc)), g)
        extra = (p.peak - before) / 1024
        print(f"SPA, second task of 10 classes x {per_class} images, {n_patches} patch tokens, d = {d}, one epoch:\n"
              f"the task's rows {rows_mb:.0f} MB; extra peak anonymous memory while it trains {extra:.0f} MB = "
              f"{extra / rows_mb:.2f}x (target <= 1.5x)")
        return extra / rows_mb


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--patches", type=int, default=196)
    a = ap.parse_args()
    main(a.per_class, a.patches)
