"""ENGINE's view term on the cifar_like world (seed = world seed = run seed), average / last / forgetting:
  cached  one cached noisy view per epoch (the default, views=None: 10 views extracted through the micro-CLIP);
  unit    views=0, the clean stand-in as the unit feature (the authors' views are unit);
  raw     views=0 with the stand-in before the fix: the raw embedding under embeddings="raw" (the function's source patched).
Usage: python benchmarks/engine_views_cifar_like.py SEED [cached] [unit] [raw]   (cache under /tmp/engine_views_cache)"""
import inspect, sys, time
import torch
import spa_toolkit.peers.engine as engine
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.world import synthetic_world
from spa_toolkit.protocol import prepare, run_method, texts_needed
from spa_toolkit.peers.engine import EngineKnobs

torch.set_num_threads(1)
seed, which = int(sys.argv[1]), sys.argv[2:]
views = 10 if "cached" in which else 0
clip = load_embedded_clip(variant="cifar_like")
prep = prepare(synthetic_world(variant="cifar_like", seed=seed), clip, cache_dir="/tmp/engine_views_cache", progress=False, views=views,
               texts=texts_needed(["engine"]))
new_src = inspect.getsource(engine.train_engine_task)
for w in which:
    src = new_src.replace("else (lambda epoch: unit)", "else (lambda epoch: g)") if w == "raw" else new_src
    assert w != "raw" or src != new_src
    exec(src, engine.__dict__)  # the module's train_engine_task, as ENGINE's train calls it
    t = time.time()
    k = EngineKnobs() if w == "cached" else EngineKnobs(views=0)
    r = run_method(prep, "engine", seed=seed, progress=False, knobs=k)
    print(f"seed {seed} {w:6s}: avg {r.average:.2f} last {r.last:.2f} forgetting {r.forgetting:.2f} ({time.time() - t:.0f} s)", flush=True)
