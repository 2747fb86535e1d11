"""Reliability as a user meets it: the default demo reruns bit-identically, a CLI run killed part-way (SIGKILL) and rerun with
`--resume` ends with the same results, and bad inputs give one clear error naming the item and the fix, never corrupting results."""
import errno, io, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openai_stub import StubOpenAI, good_reply
from test_cli import OFFLINE, SECRETS, check_user_error, cli, draw_folder, out_folder
from spa_toolkit.backbone import extract_features, open_features
from spa_toolkit.cli import main
from spa_toolkit.core import SpaError
from spa_toolkit.catalog import class_order
from spa_toolkit.data import load_benchmark
from spa_toolkit.descriptions import describe_run
from spa_toolkit.method import load_state
from spa_toolkit.metrics import RunResult
from spa_toolkit.microclip import load_embedded_clip

pytestmark = pytest.mark.slow  # subprocesses: the whole module is in the slow set

N_TRAIN, N_TASKS = 24 * 40, 6  # the demo world: 24 classes x 40 train images, B0Inc4


def start(*args, cwd: Path, **env) -> subprocess.Popen:
    "Start the CLI like `test_cli.cli` does (offline, no keys, one torch thread), output to files in `cwd`."
    env = {k: v for k, v in os.environ.items() if k not in SECRETS} | OFFLINE | dict(HF_HOME=str(cwd / "hf"), OMP_NUM_THREADS="1") | env
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "spa_toolkit.cli", *map(str, args)], cwd=cwd, env=env, stdout=out, stderr=err)


def finish(p: subprocess.Popen, cwd: Path) -> tuple[str, str]:
    "Wait for `p`; its stdout and stderr, after checking it succeeded."
    p.wait(timeout=600)
    out, err = (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()
    assert p.returncode == 0, err[-3000:]
    return out, err


def kill_when(p: subprocess.Popen, ready, timeout: float = 300):
    "SIGKILL `p` as soon as `ready()` holds (polled every 5 ms); fail if `p` ends first."
    t0 = time.monotonic()
    while not ready():
        assert p.poll() is None, "the run ended before the kill point: make it longer"
        assert time.monotonic() - t0 < timeout, "kill point never reached"
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def results(out: Path, methods=None) -> dict[str, dict]:
    "Each method's result file minus its timings."
    names = methods or [p.stem for p in out.glob("*.json") if p.stem not in ("run", "class_descriptions")]
    return {m: {k: v for k, v in json.loads((out / f"{m}.json").read_text()).items() if k != "timings"} for m in names}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list[Path]:
    "Two runs of the default demo (`python -m spa_toolkit.cli run`, no options), at once, in two fresh folders."
    cwds = [tmp_path_factory.mktemp(f"demo{i}") for i in range(2)]
    procs = [start("run", cwd=c) for c in cwds]
    return [c / out_folder(finish(p, c)[0]) for p, c in zip(procs, cwds)]


def demo_cache(demo) -> Path: return demo[0].parent.parent / ".cache"


def copy_cache(demo, tmp_path) -> Path:
    "A copy of the demo's feature cache under `tmp_path`."
    shutil.copytree(demo_cache(demo) / "features", tmp_path / "cache" / "features")
    return tmp_path / "cache"


# --- determinism -------------------------------------------------------------------------------------------------

def test_default_demo_twice_is_bit_identical(demo):
    a, b = (results(o) for o in demo)
    assert sorted(a) == ["descriptions", "ncm", "spa", "spa_global", "spa_nocal", "zeroshot"]
    assert a == b  # curves, matrices, old/new, knobs, class order: equal floats, not close ones
    meta = json.loads((demo[0] / "run.json").read_text())
    assert meta == json.loads((demo[1] / "run.json").read_text())
    assert (meta["options"]["seed"], meta["options"]["class_order_seed"]) == (0, 1993)
    assert meta["class_order"] == class_order(24, 1993)


def test_class_order_seed_and_run_seed_are_separate_and_recorded(demo, tmp_path):
    out = tmp_path / "o7"  # in a copy of the demo's cache, which holds the features labelled in the default class order
    p = cli("run", "--methods", "zeroshot", "--seed", "3", "--class-order-seed", "7", "--cache-dir", copy_cache(demo, tmp_path),
            "--out", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((out / "run.json").read_text())
    assert (meta["options"]["seed"], meta["options"]["class_order_seed"], meta["class_order"]) == (3, 7, class_order(24, 7))
    # the last task sees all 24 classes whatever their order, so zero-shot's last accuracy cannot change: this fails if the
    # cache of the demo's class order (other labels for the same images) were read back for this one
    assert results(out)["zeroshot"]["last"] == results(demo[0])["zeroshot"]["last"]
    assert results(out)["zeroshot"]["curve"] != results(demo[0])["zeroshot"]["curve"]


# --- resume after SIGKILL ----------------------------------------------------------------------------------------

def test_kill_during_feature_extraction_then_resume(demo, tmp_path):
    args = ("run", "--methods", "spa_global,ncm", "--out", "out", "--cache-dir", "cache")
    meta = lambda: next((json.loads(m.read_text()) for m in (tmp_path / "cache").glob("features/*-train-*/meta.json")), {})
    kill_when(start(*args, cwd=tmp_path), lambda: 0 < meta().get("n_done", 0) and not meta()["complete"])
    n_done = meta()["n_done"]
    assert 0 < n_done < N_TRAIN
    _, err = finish(start(*args, "--resume", cwd=tmp_path), tmp_path)
    assert f" {n_done}/{N_TRAIN} " in err  # extraction went on from the last recorded batch: only the chunk in flight was lost
    assert results(tmp_path / "out") == results(demo[0], ["spa_global", "ncm"])
    for split in ("train", "test"):
        (ours,) = (tmp_path / "cache" / "features").glob(f"*-{split}-*")
        a, b = open_features(ours), open_features(demo_cache(demo) / "features" / ours.name)
        for k in ("global_", "patches", "labels"): np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def test_kill_during_training_then_resume(demo, tmp_path):
    args = ("run", "--methods", "spa", "--out", "out", "--cache-dir", demo_cache(demo))
    state = tmp_path / "out" / "spa.state.pt"
    kill_when(start(*args, cwd=tmp_path), state.exists)
    done = len(torch.load(state, weights_only=True)["extra"]["records"])  # saved after each task's training AND evaluation
    assert 1 <= done < N_TASKS and not (tmp_path / "out" / "spa.json").exists()
    _, err = finish(start(*args, "--resume", cwd=tmp_path), tmp_path)
    assert f"| {done}/{N_TASKS} [" in err  # went on from the last finished task
    assert results(tmp_path / "out") == results(demo[0], ["spa"])


@pytest.fixture(scope="module")
def stub():
    with StubOpenAI() as s: yield s


def test_kill_during_description_generation_then_resume(demo, tmp_path, stub):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "features").symlink_to(demo_cache(demo) / "features")  # features done: the LLM calls are the work
    args = ("describe", "--llm", "openai/stub-vlm", "--api-base", stub.api_base, "--k-exemplars", "1", "--cache-dir", "cache")
    stub.reset(); stub.delay = 0.2
    cached = lambda: list((tmp_path / "cache" / "descriptions" / "description_cache").glob("*.json"))
    kill_when(start(*args, cwd=tmp_path, OPENAI_API_KEY="sk-test"), lambda: len(cached()) >= 4)
    kept = {json.loads(f.read_text())["class_name"] for f in cached()}
    names = json.loads((demo[0] / "run.json").read_text())["class_names"]
    assert 4 <= len(kept) < len(names)
    stub.reset()
    out, _ = finish(start(*args, cwd=tmp_path, OPENAI_API_KEY="sk-test"), tmp_path)
    assert sorted(stub.classes_asked()) == sorted(set(names) - kept)  # only the missing classes, each once
    assert f"24 classes ({len(kept)} from cache)" in out
    path = Path(tmp_path / out.split("descriptions written to ")[1].split()[0])
    assert json.loads(path.read_text())["descriptions"] == {c: json.loads(good_reply(c, 0)[1])["descriptions"] for c in names}


# --- bad inputs --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(): return load_embedded_clip()


def odd_images(folder: Path):
    "Images that must work: greyscale, 16-bit greyscale, CMYK, palette, RGBA and a 1x1 pixel."
    Image.new("L", (30, 20), 77).save(folder / "grey.png")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(folder / "grey16.png")
    Image.new("CMYK", (30, 20), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    Image.new("P", (9, 9), 3).save(folder / "palette.gif")
    Image.new("RGBA", (9, 9), (1, 2, 3, 4)).save(folder / "rgba.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny.png")


def test_odd_image_modes_and_sizes_are_extracted(clip, tmp_path):
    root = draw_folder(tmp_path / "odd", classes=("red", "green"), n_train=2, n_test=1)
    odd_images(root / "train" / "red")
    b = load_benchmark(str(root), cache_dir=tmp_path / "hf")
    fs = extract_features(clip, b.train, tmp_path / "features", "odd")
    assert len(fs) == 10 and np.isfinite(np.asarray(fs.global_, dtype=np.float32)).all()


def jpeg_bytes() -> bytes:
    "A valid 64x64 JPEG."
    buf = io.BytesIO(); Image.effect_noise((64, 64), 40).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("content", [b"not an image" * 10, jpeg_bytes()[:600]], ids=["corrupt", "truncated"])
def test_undecodable_image_names_the_file_and_the_fix(clip, tmp_path, content):
    root = draw_folder(tmp_path / "bad", classes=("red", "green"), n_train=2, n_test=1)
    (root / "train" / "green" / "broken.jpg").write_bytes(content)
    b = load_benchmark(str(root), cache_dir=tmp_path / "hf")
    with pytest.raises(SpaError, match=rf"cannot decode image {root}/train/green/broken\.jpg .*replace it with a valid image"):
        extract_features(clip, b.train, tmp_path / "features", "bad")


def test_undecodable_image_is_one_line_from_the_cli(tmp_path):
    root = draw_folder(tmp_path / "bad", classes=("red", "green"), n_train=2, n_test=1)
    (root / "test" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    check_user_error(cli("features", "--dataset", root, cwd=tmp_path), f"cannot decode image {root}/test/red/broken.png")


def test_class_folders_differing_only_in_case_are_refused(tmp_path):
    root = tmp_path / "case"
    for folder in (root / s / c for s in ("train", "test") for c in ("Cat", "cat", "dog")):
        folder.mkdir(parents=True); Image.new("RGB", (4, 4)).save(folder / "0.png")
    with pytest.raises(SpaError, match=r"\[\['Cat', 'cat'\]\] differ only in case.*merge or rename"): load_benchmark(str(root))


def run_in_process(capsys, *args) -> tuple[int, str]:
    "`main(args)` in this process: its status and last stderr line (no traceback escapes)."
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


@pytest.mark.parametrize("descs, needle", [
    ("missing", "has no descriptions: generate them"),
    ("empty", "must map to a non-empty list of non-empty strings"),
    ('{"a": ["x"], "a": ["y"]}', "['a'] appear more than once in one object"),
])
def test_bad_descriptions_file_is_named_with_the_fix(demo, tmp_path, capsys, descs, needle):
    names = json.loads((demo[0] / "run.json").read_text())["class_names"]
    whole = {c: ["a visible part"] for c in names}
    text = {"missing": json.dumps({c: v for c, v in whole.items() if c != names[5]}),
            "empty": json.dumps(whole | {names[5]: []})}.get(descs, descs)
    (tmp_path / "d.json").write_text(text)
    rc, last = run_in_process(capsys, "run", "--methods", "zeroshot", "--descriptions", tmp_path / "d.json",
                              "--cache-dir", demo_cache(demo), "--out", tmp_path / "out")
    assert rc == 2 and needle in last, last
    assert descs != "missing" or repr(names[5]) in last
    assert descs == "missing" or str(tmp_path / "d.json") in last


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_cached_features_name_the_cache_and_the_fix(demo, tmp_path, capsys, value):
    cache = copy_cache(demo, tmp_path)
    (folder,) = (cache / "features").glob("*-train-*")
    g = np.load(folder / "global.npy", mmap_mode="r+"); g[5, 3] = value; g.flush(); del g
    rc, last = run_in_process(capsys, "run", "--methods", "ncm", "--cache-dir", cache, "--out", tmp_path / "out")
    assert rc == 2 and f"cached features in {folder} holds 1 NaN/Inf" in last and "delete its cache" in last, last
    assert not (tmp_path / "out" / "ncm.json").exists()


@pytest.mark.parametrize("name, cut", [("ncm.json", 30), ("ncm.state.pt", 200)])
def test_truncated_result_or_state_is_reported_on_resume(demo, tmp_path, capsys, name, cut):
    out = tmp_path / "out"; out.mkdir()
    (out / name).write_bytes((demo[0] / name).read_bytes()[:cut])
    rc, last = run_in_process(capsys, "run", "--methods", "ncm", "--resume", "--cache-dir", demo_cache(demo), "--out", out)
    assert rc == 2 and str(out / name) in last and "delete it" in last, last


def full_disk(data, path, *args, **kwargs):
    "A writer that writes part of its output to `path`, then fails like a full disk."
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_previous_result_and_says_so(demo, tmp_path, monkeypatch):
    res = RunResult.load(demo[0] / "ncm.json")
    path = res.save(tmp_path / "ncm.json")
    before = path.read_bytes()
    monkeypatch.setattr(Path, "write_text", lambda self, text, **kw: full_disk(text, self))
    with pytest.raises(SpaError, match=rf"no space left on the device writing {path} \(its previous version is intact\)"):
        res.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ncm.json"]


def test_full_disk_keeps_the_previous_state_and_says_so(demo, tmp_path, monkeypatch):
    state, extra = load_state(demo[0] / "spa.state.pt")
    path = state.save(tmp_path / "spa.state.pt", **extra)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SpaError, match=rf"writing {path} \(its previous version is intact\): free some disk space"):
        state.save(path, **extra)
    monkeypatch.undo()
    assert path.read_bytes() == before and len(load_state(path)[1]["records"]) == N_TASKS


# --- LLM replies the description tests do not cover ----------------------------------------------------------------

@pytest.mark.parametrize("reply", ['{"descriptions": []}', "[]", '{"descriptions": ["", "  "]}'], ids=["empty-object", "empty-list", "blank"])
def test_llm_empty_answer_is_retried_then_named(stub, reply):
    stub.reset()
    stub.reply = lambda c, a: (200, reply)
    with pytest.raises(SpaError, match=r"no usable descriptions for class 'fox' after 2 attempts.*rerun later"):
        describe_run(["fox"], None, model="openai/test", api_base=stub.api_base, api_key="sk-x", max_retries=1, backoff=0.01)
    assert len(stub.requests) == 2


def test_llm_that_always_times_out_is_named_with_the_fix(stub):
    stub.reset(); stub.delay = 1.0
    with pytest.raises(SpaError, match=r"class 'fox' after 2 attempts \(last: Timeout.*raise max_retries/backoff/timeout"):
        describe_run(["fox"], None, model="openai/test", api_base=stub.api_base, api_key="sk-x", max_retries=1, backoff=0.01,
                     timeout=0.2)
    stub.reset()


def test_resume_into_an_explicit_out_refuses_another_runs_results(tmp_path):
    "`--out X --resume` with another seed must not pick up X's results or states from the first seed."
    first = cli("run", "--methods", "ncm,spa_global", "--epochs", "1", "--out", tmp_path / "x", cwd=tmp_path, OMP_NUM_THREADS="1")
    assert first.returncode == 0, first.stderr[-2000:]
    again = cli("run", "--methods", "ncm,spa_global", "--epochs", "1", "--out", tmp_path / "x", "--seed", "1", "--resume",
                cwd=tmp_path, OMP_NUM_THREADS="1")
    check_user_error(again, "belongs to another run", "--out")
