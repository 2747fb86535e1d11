"""Feature extraction throughput, and a training epoch over cached features vs one that runs the backbone every batch.

Both epochs train the same linear head (SGD) on the same inputs — the global embedding and the mean patch token — so the
ratio is what caching frozen features saves. Measured side by side in one run, on synthetic images:

    python benchmarks/bench_features.py                      # tiny CLIP, 64 images, CPU, seconds
    python benchmarks/bench_features.py --vit-b16 --n 32     # random-init ViT-B-16 at 224 px (slow on CPU)
    python benchmarks/bench_features.py --vit-b16 --n 60000 --device cuda --workers 8   # the GPU target
"""
import argparse, tempfile, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spa_toolkit.backbone import _batch_features, extract_features, load_clip
from spa_toolkit.core import make_generator
from spa_toolkit.fixtures import TINY_ARCH, WEIGHTS_FILE, make_tiny_clip, tiny_images


def _head_input(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    "Head input [B, 2d]: global embedding and mean patch token."
    return torch.cat([g, p.mean(1)], dim=1)


def _step(head, opt, x, y):
    loss = F.cross_entropy(head(x), y)
    opt.zero_grad(); loss.backward(); opt.step()


def cached_epoch(fs, head, opt, batch_size, gen):
    "One epoch reading batches from the memory-mapped cache."
    labels = torch.from_numpy(fs.labels)
    for idx in torch.randperm(len(fs), generator=gen).split(batch_size):
        rows = np.sort(idx.numpy())
        g, p = (torch.from_numpy(a[rows]).float() for a in (fs.global_, fs.patches))
        _step(head, opt, _head_input(g, p), labels[rows])


def backbone_epoch(clip, rows, head, opt, batch_size, gen):
    "One epoch that transforms and encodes every batch with the frozen backbone."
    for idx in torch.randperm(len(rows), generator=gen).split(batch_size):
        x = torch.stack([clip.preprocess(rows[i]["image"]) for i in idx.tolist()])
        f = _batch_features(clip, x, "all", "tokens")  # the extraction path itself (inference mode, autocast where it applies)
        g, p = (torch.from_numpy(f[k]).float() for k in ("global", "patches"))
        _step(head, opt, _head_input(g, p), torch.tensor([rows[i]["label"] for i in idx.tolist()]))


def _timed(f) -> float:
    t = time.perf_counter(); f()
    if torch.cuda.is_available(): torch.cuda.synchronize()
    return time.perf_counter() - t


def _clip(vit_b16: bool, device: str, tmp: Path):
    if vit_b16: return load_clip("ViT-B-16", None, device=device, allow_random=True)
    return load_clip(TINY_ARCH, make_tiny_clip(tmp) / WEIGHTS_FILE, device=device)


def bench(n: int, vit_b16: bool, device: str, batch_size: int, workers: int, cached_epochs: int, n_classes: int):
    "Print extraction throughput and the cached-vs-backbone epoch time ratio."
    tmp = Path(tempfile.mkdtemp())
    clip = _clip(vit_b16, device, tmp)
    rows = [{"image": im, "label": i % n_classes} for i, im in enumerate(tiny_images(n, size=clip.image_size))]
    t_ext = _timed(lambda: extract_features(clip, rows, tmp / "cache", "bench", batch_size=batch_size, num_workers=workers))
    fs = extract_features(clip, rows, tmp / "cache", "bench")
    gen = make_generator(0)
    head = torch.nn.Linear(2 * clip.embed_dim, n_classes)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    cached_epoch(fs, head, opt, batch_size, gen)  # warm-up
    t_cached = sum(_timed(lambda: cached_epoch(fs, head, opt, batch_size, gen)) for _ in range(cached_epochs)) / cached_epochs
    t_backbone = _timed(lambda: backbone_epoch(clip, rows, head, opt, batch_size, gen))
    name = "ViT-B-16 (random init)" if vit_b16 else TINY_ARCH
    print(f"model {name}, {clip.image_size}px, {n} images, device {clip.device}, batch {batch_size}, torch threads {torch.get_num_threads()}")
    print(f"extraction:            {t_ext:8.3f} s  = {n / t_ext:9.1f} images/s  (global + all {clip.n_patches} patch tokens)")
    print(f"epoch, backbone:       {t_backbone:8.3f} s")
    print(f"epoch, cached (mean {cached_epochs}): {t_cached:8.4f} s")
    print(f"cached epoch speed-up: {t_backbone / t_cached:8.1f}x")
    print(f"patch cache on disk:   {fs.patches.nbytes / 1e6:8.2f} MB, read per batch: {fs.patches[:batch_size].nbytes / 1e6:.2f} MB")


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="synthetic images")
    p.add_argument("--vit-b16", action="store_true", help="random-init ViT-B-16 at 224 px instead of the tiny CLIP")
    p.add_argument("--device", default="cpu", help="where the backbone runs")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (extraction and training)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images during extraction")
    p.add_argument("--cached-epochs", type=int, default=5, help="cached epochs to average (the backbone epoch runs once)")
    p.add_argument("--n-classes", type=int, default=10, help="classes of the synthetic labels")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default; 1 avoids spin-waits on a busy machine)")
    return p.parse_args()


if __name__ == "__main__":
    a = _args()
    if a.threads: torch.set_num_threads(a.threads)
    bench(a.n, a.vit_b16, a.device, a.batch_size, a.workers, a.cached_epochs, a.n_classes)
