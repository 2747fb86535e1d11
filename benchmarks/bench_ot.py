"""Batched OT versus POT, and the memory of scoring many images against many classes.

1. Speed: the 64 x 100 problems of 16 x 8 that one inference batch poses (float32, CPU), solved by `spa_toolkit.ot.sinkhorn`
   in one batch versus a Python loop over `ot.sinkhorn(method="sinkhorn_log")` with the same fixed number of sweeps (so both
   produce the same iterates); prints the speed ratio, the largest plan difference and both marginal errors (convergence).
2. Memory: images stream in batches through `patch_ot_scores` against 100 classes (N=196 patches, d=512, M=8, k=16), chunked
   over classes, in a fresh process per image count; prints the peak extra resident memory for each count (Linux: peak RSS,
   reset through /proc/self/clear_refs, minus the RSS before streaming; it should not grow with the count) next to the
   analytic bytes of one chunk's tensors.

Usage: python benchmarks/bench_ot.py [--images 500 2000] [--threads 1]
"""
import argparse, multiprocessing as mp, time

import numpy as np
import ot
import torch

from spa_toolkit.core import l2norm, make_generator
from spa_toolkit.ot import patch_ot_scores, sinkhorn


def costs(n_problems, k, m, d, seed=0):
    "Cosine costs 1 - Z T^T between random unit vectors, [n_problems, k, m] float32."
    g = make_generator(seed)
    return 1 - l2norm(torch.randn(n_problems, k, d, generator=g)) @ l2norm(torch.randn(n_problems, m, d, generator=g)).mT


def best_time(f, reps=5):
    "Best wall time of `reps` calls (after one warm-up) and the last result."
    out = f(); times = []
    for _ in range(reps):
        t0 = time.perf_counter(); out = f(); times.append(time.perf_counter() - t0)
    return min(times), out


def pot_loop(C, eps, ot_iters):
    "POT's log-domain Sinkhorn, one problem at a time, the same fixed number of sweeps."
    a, b = np.full(C.shape[1], 1 / C.shape[1], np.float32), np.full(C.shape[2], 1 / C.shape[2], np.float32)
    return np.stack([ot.sinkhorn(a, b, c, eps, method="sinkhorn_log", numItermax=ot_iters, stopThr=0, warn=False) for c in C])


def col_error(plan): return float(np.abs(np.asarray(plan).sum(-2) - 1 / plan.shape[-1]).max())


def bench_speed(B=64, C=100, k=16, m=8, d=512, eps=0.1, ot_iters=50):
    "Print batched-vs-loop timings, ratio, plan difference and convergence."
    Cm = costs(B * C, k, m, d)
    t_ours, plan = best_time(lambda: sinkhorn(Cm.view(B, C, k, m), eps=eps, ot_iters=ot_iters))
    t_batch, pb = best_time(lambda: ot.batch.solve_batch(Cm, eps, max_iter=ot_iters, tol=0, method="log_sinkhorn").plan)
    t0 = time.perf_counter(); ref = pot_loop(Cm.numpy(), eps, ot_iters); t_loop = time.perf_counter() - t0
    plan = plan.reshape(B * C, k, m).numpy()
    print(f"speed: {B}x{C} problems of {k}x{m}, float32, eps={eps}, {ot_iters} sweeps, {torch.get_num_threads()} thread(s)")
    print(f"  loop over ot.sinkhorn {t_loop:.3f} s | ot.batch.solve_batch {t_batch:.3f} s | spa_toolkit.ot.sinkhorn {t_ours:.4f} s")
    print(f"  speed ratio vs loop: {t_loop / t_ours:.0f}x (target >= 50x); vs solve_batch: {t_batch / t_ours:.1f}x")
    print(f"  max |plan - POT plan|: {np.abs(plan - ref).max():.2e} (target <= 1e-5); vs solve_batch: {np.abs(plan - pb.numpy()).max():.2e}")
    print(f"  column-marginal error after {ot_iters} sweeps: ours {col_error(plan):.1e}, POT {col_error(ref):.1e}")


def mem_status(field):
    "A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in bytes (Linux)."
    with open("/proc/self/status") as f: return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))


def stream_eval(n_images, batch, n_classes, n_patches, d, m, k, chunk, threads, q):
    "Child process: score `n_images` random images against `n_classes`, batch by batch; report the peak extra memory."
    torch.set_num_threads(threads)
    g = make_generator(1)
    sem = l2norm(torch.randn(n_classes, m, d, generator=g))
    with open("/proc/self/clear_refs", "w") as f: f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = mem_status("VmRSS"); t0 = time.perf_counter(); n_done = 0
    with torch.no_grad():
        while n_done < n_images:
            b = min(batch, n_images - n_done)
            patches = l2norm(torch.randn(b, n_patches, d, generator=g))
            patch_ot_scores(patches, sem, k_patches=k, class_chunk=chunk).cpu()
            n_done += b
    q.put((mem_status("VmHWM") - base, time.perf_counter() - t0))


def chunk_bytes(batch, chunk, n_patches, d, m, k):
    "Analytic float32 bytes of one chunk's main tensors: patches, similarities, their masked copy, selection and Sinkhorn."
    return 4 * (batch * n_patches * d + 2 * batch * chunk * n_patches * m + batch * chunk * k * (2 + 6 * m))


def bench_memory(counts, batch=256, n_classes=100, n_patches=196, d=512, m=8, k=16, chunk=25, threads=1):
    "Print the peak extra memory of streamed evaluation for each image count."
    print(f"memory: {n_classes} classes, N={n_patches}, d={d}, M={m}, k={k}, image batch {batch}, class chunk {chunk}")
    print(f"  analytic bytes of one chunk's tensors: {chunk_bytes(batch, chunk, n_patches, d, m, k) / 2**20:.0f} MiB")
    ctx = mp.get_context("spawn")
    for n in counts:
        q = ctx.Queue()
        p = ctx.Process(target=stream_eval, args=(n, batch, n_classes, n_patches, d, m, k, chunk, threads, q)); p.start()
        extra, secs = q.get(); p.join()
        print(f"  {n:>6} images: peak extra memory {extra / 2**20:.0f} MiB (target <= 2048 MiB); "
              f"{secs:.1f} s, {1e3 * secs / n:.1f} ms/image -> {10_000 * secs / n / 60:.1f} min for 10,000 images")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[500, 2000], help="image counts for the memory run")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the POT loop uses one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_speed()
    bench_memory(args.images, threads=args.threads)
