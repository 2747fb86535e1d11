"""One prepared GPU benchmark (<= 5 minutes on one GPU): what a user's CIFAR-100 B0Inc10 run costs, stage by stage.

1. Extraction images/s of a random-init ViT-B-16 (speed does not depend on weight values) per precision (fp32, amp_bf16),
   on CIFAR-shaped input through the real decode path: 32-px PNG bytes (as Hugging Face's CIFAR-100 stores them) decoded
   and resized to 224 by the model's own preprocessing in the loader's workers (`transform_on="host"`), or sent as uint8
   pixels and resized on the device (`"device"`), at the CLI's batch size (64), 10,000 images a run (the test split's
   size: start-up amortised), after a warm-up batch.
2. The SPA protocol (train and evaluate every task) on random unit features with CIFAR-100 shapes (50,000 train / 10,000
   test, 100 classes, 196 patches, d = 512, 10 tasks): seconds per task for training and for evaluation, peak GPU memory;
   every generator is made on the device the state lives on. Then its first tasks again with the step compiled
   (`SpaKnobs(compile_step=True)`: fixed shapes, `torch.compile` once a task, CUDA graphs on CUDA), each task's seconds
   including its compile, against the eager step's seconds on the same tasks.
3. End to end, derived: 60,000 images at an extraction rate plus the protocol, at the CLI's defaults (fp32, the host
   transform) and at the fastest (precision, transform) measured (a best case: the CLI does not offer the device
   transform). Target (issue 29): <= 60 s on one H100/H200 with bf16 extraction.
Prints a table and writes JSON (--json PATH). `--smoke`: tiny sizes and the embedded micro-CLIP, for CPU (run by a test).
Usage: python benchmarks/bench_gpu.py [--json bench_gpu.json] [--device cuda] [--smoke]
"""
import argparse, io, json, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spa_toolkit.backbone import FeatureSet, extract_features, load_clip
from spa_toolkit.base import SpaKnobs
from spa_toolkit.core import l2norm, make_generator, pick_device
from spa_toolkit.learner import SPA, new_state, train_task
from spa_toolkit.method import TextSide
from spa_toolkit.protocol import evaluate
from spa_toolkit.microclip import load_embedded_clip

FULL = dict(arch="ViT-B-16", n_images=10_000, batch_size=64, n_train=50_000, n_test=10_000, n_classes=100, n_patches=196, d=512,
            n_desc=8, n_tasks=10, precisions="fp32,amp_bf16", image_px=32, e2e_images=60_000, compiled_tasks=2)
SMOKE = dict(arch="embedded", n_images=48, batch_size=16, n_train=200, n_test=100, n_classes=10, n_patches=16, d=32,
             n_desc=4, n_tasks=2, precisions="fp32", image_px=32, e2e_images=300, compiled_tasks=1)

class Images:
    "`n` CIFAR-shaped rows: random `size`-px images stored as PNG bytes, each decoded when its row is read."
    def __init__(self, n: int, size: int = 32, distinct: int = 256):
        rng = np.random.default_rng(0)
        self.n, self.items = n, [_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(distinct)]
    def __len__(self): return self.n
    def __getitem__(self, i: int):
        return dict(image=Image.open(io.BytesIO(self.items[i % len(self.items)])), label=i % 10)

def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO(); Image.fromarray(pixels).save(buf, format="PNG"); return buf.getvalue()

def _sync(device: torch.device):
    if device.type == "cuda": torch.cuda.synchronize(device)

def extraction(cfg: dict, device: torch.device, precision: str, transform_on: str) -> float:
    "Images/s of a fresh extraction (after a warm-up batch) into a temporary cache, workers at their default."
    clip = (load_embedded_clip(device, precision) if cfg["arch"] == "embedded"
            else load_clip(cfg["arch"], None, device=device, precision=precision, allow_random=True))
    work, px = Path(tempfile.mkdtemp()), cfg["image_px"]
    run = dict(batch_size=cfg["batch_size"], progress=False, transform_on=transform_on)
    extract_features(clip, Images(cfg["batch_size"], px), work, "warmup", **run)
    _sync(device); t0 = time.perf_counter()
    extract_features(clip, Images(cfg["n_images"], px), work, "timed", **run)
    _sync(device)
    return cfg["n_images"] / (time.perf_counter() - t0)

def random_split(n: int, cfg: dict, gen: torch.Generator, device: torch.device) -> FeatureSet:
    "An in-memory FeatureSet of `n` random unit float16 features (drawn on `device` a chunk at a time), labels balanced."
    unit = lambda *shape: l2norm(torch.randn(*shape, generator=gen, device=device)).half().cpu().numpy()
    patches = np.concatenate([unit(len(c), cfg["n_patches"], cfg["d"]) for c in np.array_split(np.arange(n), max(1, n // 2048))])
    labels = np.arange(n) % cfg["n_classes"]
    return FeatureSet(unit(n, cfg["d"]), patches, None, labels, Path("."), {})

def protocol(cfg: dict, device: torch.device, knobs: SpaKnobs = SpaKnobs(), n_tasks: int | None = None) -> dict:
    """Train and evaluate SPA with `knobs` task by task (the first `n_tasks`; None: all) on random CIFAR-shaped features:
    seconds and peak GPU memory."""
    gen = make_generator(0, device)
    train, test = random_split(cfg["n_train"], cfg, gen, device), random_split(cfg["n_test"], cfg, gen, device)
    c, m, d = cfg["n_classes"], cfg["n_desc"], cfg["d"]
    text = TextSide(l2norm(torch.randn(c, d, generator=gen, device=device)), l2norm(torch.randn(c, m, d, generator=gen, device=device)),
                    torch.ones(c, m, dtype=torch.bool, device=device))
    state = new_state(text, 100.0, knobs=knobs)
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(device)
    train_s, eval_s = [], []
    for classes in np.array_split(np.arange(c), cfg["n_tasks"])[:n_tasks]:
        _sync(device); t0 = time.perf_counter()
        train_task(state, train, classes.tolist(), gen)
        _sync(device); t1 = time.perf_counter()
        evaluate(SPA, state, test)
        _sync(device); t2 = time.perf_counter()
        train_s.append(t1 - t0); eval_s.append(t2 - t1)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(train_s=sum(train_s), eval_s=sum(eval_s), total_s=sum(train_s) + sum(eval_s), peak_gpu_mib=peak,
                train_s_per_task=train_s, eval_s_per_task=eval_s)

def run(cfg: dict, device: torch.device) -> dict:
    "Every measurement of the benchmark, as one JSON-able dict."
    ext = [dict(precision=p, transform_on=t, images_per_s=extraction(cfg, device, p, t))
           for p in cfg["precisions"].split(",") for t in ("host", "device")]
    prot = protocol(cfg, device)
    compiled = protocol(cfg, device, SpaKnobs(compile_step=True), cfg["compiled_tasks"])
    rate = lambda p, t: next(e["images_per_s"] for e in ext if (e["precision"], e["transform_on"]) == (p, t))
    best = max(ext, key=lambda e: e["images_per_s"])
    e2e = {k: dict(images=cfg["e2e_images"], precision=p, transform_on=t, protocol_s=prot["total_s"],
                   extract_s=cfg["e2e_images"] / rate(p, t))
           for k, (p, t) in (("cli_defaults", ("fp32", "host")), ("fastest", (best["precision"], best["transform_on"])))}
    for v in e2e.values(): v["total_s"] = v["extract_s"] + v["protocol_s"]
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", config=cfg, extraction=ext,
                protocol=prot, compiled_step=compiled, end_to_end=e2e, torch=torch.__version__)

def table(res: dict) -> str:
    "The results as a plain-text table."
    px = res["config"]["image_px"]
    lines = [f"device: {res['device']}  arch: {res['config']['arch']}",
             f"extraction    precision  transform ({px}-px PNG, batch {res['config']['batch_size']})   images/s"]
    lines += [f"              {e['precision']:<10} {e['transform_on']:<33} {e['images_per_s']:9.1f}" for e in res["extraction"]]
    p, c = res["protocol"], res["config"]
    peak = "n/a" if p["peak_gpu_mib"] is None else f"{p['peak_gpu_mib']:.0f} MiB"
    lines.append(f"SPA protocol  {c['n_train']} train / {c['n_test']} test, {c['n_classes']} classes, {c['n_patches']} patches, "
                 f"{c['n_tasks']} tasks: train {p['train_s']:.1f} s, eval {p['eval_s']:.1f} s, total {p['total_s']:.1f} s, peak {peak}")
    lines.append("  per task, train s: " + " ".join(f"{t:.2f}" for t in p["train_s_per_task"]))
    lines.append("  per task, eval s:  " + " ".join(f"{t:.2f}" for t in p["eval_s_per_task"]))
    k = res["compiled_step"]["train_s_per_task"]
    lines.append(f"  compiled step (compile_step=True), first {len(k)} tasks, train s with each task's compile: "
                 + " ".join(f"{t:.2f}" for t in k) + "  (eager: " + " ".join(f"{t:.2f}" for t in p["train_s_per_task"][:len(k)]) + ")")
    for name, e in res["end_to_end"].items():
        lines.append(f"end to end (derived, {name}: {e['precision']}, {e['transform_on']} transform): {e['images']} "
                     f"images {e['extract_s']:.1f} s + protocol {e['protocol_s']:.1f} s = {e['total_s']:.1f} s "
                     "(target on one H100/H200 in bf16: <= 60 s)")
    return "\n".join(lines)

def main(device: str, smoke: bool, json_path: str | None):
    res = run(SMOKE if smoke else FULL, pick_device(device))
    print(table(res))
    if json_path: Path(json_path).write_text(json.dumps(res, indent=1) + "\n")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and the embedded micro-CLIP (seconds on CPU)")
    ap.add_argument("--json", dest="json_path", help="also write the results here as JSON")
    main(**vars(ap.parse_args()))
