"Sharded extraction under a real `torchrun` launch (gloo, 2 CPU processes): byte-identical to one process, and a killed rank resumes its shard."
import json, os, re, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses: the whole module is in the slow set

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0"]
ENV = os.environ | dict(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LITELLM_LOCAL_MODEL_COST_MAP="True")

# one rank of a launch on a tiny synthetic world: rank DIE_RANK exits like a killed process when asked for row DIE_AT,
# and fails when asked for a row below SKIP_BELOW (rows its last run already wrote)
WORKER = """
import os, sys
from spa_toolkit.world import synthetic_world
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.distributed import close_distributed, env_rank, extract_sharded, init_distributed
r = init_distributed("cpu")
world = synthetic_world(n_classes=4, n_train=3, n_test=2)
die_at, skip_below = int(os.environ.get("DIE_AT", -1)), int(os.environ.get("SKIP_BELOW", -1))
mine = r.rank == int(os.environ.get("DIE_RANK", -1))
class Watched:
    def __len__(self): return len(world.train)
    def __getitem__(self, i):
        if mine and i == die_at: os._exit(9)
        if mine and i < skip_below: raise RuntimeError(f"row {i} extracted again")
        return world.train[i]
extract_sharded(load_embedded_clip(), Watched(), sys.argv[1], "tiny-train", batch_size=2, num_workers=0, progress=False, record_every=1)
close_distributed()
"""

# noisy views (ENGINE's) of the same tiny world: each view's noise depends on its (image, view) alone, so sharding changes nothing
VIEWS_WORKER = """
import sys
from spa_toolkit.backbone import NoisyViews
from spa_toolkit.world import synthetic_world
from spa_toolkit.microclip import load_embedded_clip
from spa_toolkit.distributed import close_distributed, extract_sharded, init_distributed
init_distributed("cpu")
clip, world = load_embedded_clip(), synthetic_world(n_classes=4, n_train=3, n_test=2)
extract_sharded(clip, NoisyViews(world.train, clip.preprocess, 3, 0.25, 0), sys.argv[1], "tiny-train-views", patches="none",
                batch_size=5, num_workers=0, progress=False)
close_distributed()
"""

def arrays(cache: Path) -> dict[str, bytes]:
    "Every .npy file's bytes under `cache`, by path relative to it."
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.npy"))}

def metas(cache: Path) -> dict[str, dict]:
    "Every meta.json under `cache` without its `world_size`, by folder name."
    return {p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "world_size"} for p in cache.rglob("meta.json")}

def launch(cmd: list, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV | env, capture_output=True, text=True, timeout=600)

def test_two_gloo_ranks_write_the_one_process_cache_byte_for_byte(tmp_path):
    cli = ["-m", "spa_toolkit.cli", "features", "--device", "cpu", "--extract-batch-size", "50"]
    one = launch([sys.executable, *cli, "--cache-dir", "one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([*TORCHRUN, *cli, "--cache-dir", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("images, cached in") == 2  # rank 0 reports, rank 1 does not
    a, b = arrays(tmp_path / "one"), arrays(tmp_path / "two")
    # global features, their raw norms, pre-projection features, patches, labels of train and test, in same-named folders
    assert len(a) == 10 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    assert metas(tmp_path / "one") == metas(tmp_path / "two")
    assert {json.loads(p.read_text())["world_size"] for p in (tmp_path / "two").rglob("meta.json")} == {2}
    assert not list((tmp_path / "two").rglob("shard-*.json"))

def test_a_killed_rank_resumes_its_shard(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    killed = launch([*TORCHRUN, "worker.py", "two"], tmp_path, DIE_RANK="1", DIE_AT="10")
    assert killed.returncode != 0
    (folder,) = (tmp_path / "two").iterdir()
    assert json.loads((folder / "shard-1-of-2.json").read_text()) == dict(rows=[6, 12], n_done=10)
    assert not json.loads((folder / "meta.json").read_text())["complete"]
    resumed = launch([*TORCHRUN, "worker.py", "two"], tmp_path, DIE_RANK="1", SKIP_BELOW="10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = launch([sys.executable, "worker.py", "one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = arrays(tmp_path / "one"), arrays(tmp_path / "two")
    assert len(a) == 5 and a == b  # global, raw norms, pre-projection, patches, labels
    labels = np.load(folder / "labels.npy")
    assert len(labels) == 12 and sorted(set(labels.tolist())) == [0, 1, 2, 3]

def test_two_gloo_ranks_write_the_one_process_noisy_views(tmp_path):
    (tmp_path / "views.py").write_text(VIEWS_WORKER)
    for cmd, out in (([*TORCHRUN, "views.py"], "two"), ([sys.executable, "views.py"], "one")):
        p = launch([*cmd, out], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = arrays(tmp_path / "one"), arrays(tmp_path / "two")
    assert len(a) == 4 and a == b  # global, raw norms, pre-projection, labels of 12 images x 3 views
    g = np.load(next((tmp_path / "one").rglob("global.npy")))
    assert g.shape[0] == 36 and not np.array_equal(g[0], g[1])  # two views of image 0 differ

def test_a_torchrun_run_extracts_engines_views_on_both_ranks(tmp_path):
    cli = ["-m", "spa_toolkit.cli", "run", "--device", "cpu", "--methods", "engine", "--extract-batch-size", "50"]
    p = launch([*TORCHRUN, *cli, "--cache-dir", "cache", "--out", "out"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^\| engine \| synthetic \| B0Inc4 \|", p.stdout, re.M), p.stdout
    metas = {m.parent.name: json.loads(m.read_text()) for m in (tmp_path / "cache").rglob("meta.json")}
    (views,) = [m for name, m in metas.items() if "-train-views10-" in name]  # ENGINE: one view an epoch, 10 epochs
    (train,) = [m for name, m in metas.items() if "-train-" in name and "-views" not in name]
    assert views["complete"] and views["world_size"] == 2 and views["n"] == 10 * train["n"]
