"The command line driven as a user drives it: `python -m spa_toolkit.cli ...` in a fresh process, offline, in a scratch folder."
import json, os, re, subprocess, sys, time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from openai_stub import StubOpenAI, image_urls

pytestmark = pytest.mark.slow  # subprocesses: the whole module is in the slow set

SECRETS = ("OPENAI_API_KEY", "SPA_DATA_ROOT", "GEMINI_API_KEY", "GOOGLE_API_KEY")
OFFLINE = dict(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
SUMMARY = re.compile(r"^\| (\w+) \| (\S+) \| (\w+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", re.M)


def cli(*args, cwd: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    "Run the CLI in a new process in `cwd`, offline, with no API keys or data root, HF caches under `cwd`."
    e = {k: v for k, v in os.environ.items() if k not in SECRETS} | OFFLINE | dict(HF_HOME=str(cwd / "hf")) | env
    return subprocess.run([sys.executable, "-m", "spa_toolkit.cli", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def printed_summary(stdout: str) -> dict[str, tuple[float, float]]:
    "method -> (Avg, Last) as printed in the summary table."
    return {m[1]: (float(m[5]), float(m[6])) for m in SUMMARY.finditer(stdout)}


def out_folder(stdout: str) -> Path:
    return Path(re.search(r"results written to (\S+)", stdout)[1])


def check_user_error(p: subprocess.CompletedProcess, *needles: str):
    "Status 2, the last stderr line is one `error:` line holding every needle, and no traceback."
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "error:" in last, last
    for n in needles: assert n in last, (n, last)


def draw_folder(root: Path, classes=("red", "green", "blue"), n_train=6, n_test=3) -> Path:
    "A tiny ImageFolder benchmark: a coloured disc per class on a grey background, placed at random."
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", (40, 40), (128, 128, 128))
                x, y = (7 * i) % 20, (11 * i) % 20
                ImageDraw.Draw(img).ellipse([x, y, x + 18, y + 18], fill=c)
                img.save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("command", [[], ["run"], ["bench"], ["study"], ["describe"], ["features"]],
                         ids=lambda c: " ".join(c) or "spa_toolkit")
def test_help_of_each_subcommand(tmp_path, command):
    p = cli(*command, "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: spa_toolkit")
    if command in (["run"], ["bench"], ["study"]):
        assert "--k-patches K_PATCHES" in p.stdout and "patches kept per image" in p.stdout and "(default: 16)" in p.stdout
        assert "--calibration, --no-calibration" in p.stdout and "--scorer" not in p.stdout


def test_default_run_prints_what_it_writes(tmp_path):
    t0 = time.perf_counter()
    p = cli("run", cwd=tmp_path)
    wall = time.perf_counter() - t0
    print(f"`python -m spa_toolkit.cli run` took {wall:.1f} s")
    assert p.returncode == 0, p.stderr[-3000:]
    shown, out = printed_summary(p.stdout), tmp_path / out_folder(p.stdout)
    assert list(shown) == ["spa", "spa_global", "spa_nocal", "zeroshot", "descriptions", "ncm"]
    for m, (avg, last) in shown.items():
        saved = json.loads((out / f"{m}.json").read_text())
        assert (round(saved["average"], 2), saved["last"]) == (avg, last), m
        assert f"| {m} | " + " | ".join(f"{a:.2f}" for a in saved["curve"]) + " |" in p.stdout
    meta = json.loads((out / "run.json").read_text())
    assert (meta["benchmark"], meta["setting"], len(meta["class_order"])) == ("synthetic", "B0Inc4", 24)
    assert meta["knobs"]["spa"]["k_patches"] == 16 and meta["versions"]["torch"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and "| spa |" in (out / "results.md").read_text()
    assert p.stdout.startswith("backbone: embedded micro-CLIP") and (out / "results.md").read_text().startswith("backbone: ")
    assert "spa: 100%" in p.stderr  # a progress bar over each method's tasks


def test_resume_finds_its_folder_and_reuses_results(tmp_path):
    args = ("run", "--methods", "spa,ncm", "--epochs", "1", "--k-patches", "4")
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli(*args, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert out_folder(again.stdout) == out_folder(first.stdout)
    assert printed_summary(again.stdout) == printed_summary(first.stdout)
    assert "spa: " not in again.stderr  # read back, not retrained
    other = cli("run", "--methods", "ncm", "--epochs", "2", cwd=tmp_path)
    assert out_folder(other.stdout) != out_folder(first.stdout)  # other knobs, other folder


def test_folder_data_defaults_explained(tmp_path):
    "A folder of 6 classes, named with underscores, given no model, descriptions or setting."
    root = draw_folder(tmp_path / "shapes", classes=("red", "green", "blue", "yellow", "white", "black"), n_train=3, n_test=2)
    (root / "train" / "blue").rename(root / "train" / "blue_square"); (root / "test" / "blue").rename(root / "test" / "blue_square")
    p = cli("run", "--dataset", root, "--methods", "spa,zeroshot,ncm", "--epochs", "1", "--out", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"note: {root} runs on the embedded micro-CLIP" in p.stderr and "--arch ViT-B-16 --pretrained laion400m_e32" in p.stderr
    assert "note: shapes has no descriptions: its prompt templates stand in" in p.stderr
    assert p.stdout.startswith("backbone: embedded micro-CLIP")
    assert "| spa † |" in p.stdout and "| ncm |" in p.stdout and "| zeroshot |" in p.stdout  # only SPA used the descriptions
    assert "† spa: the class descriptions were the prompt templates only" in p.stdout
    spa = json.loads((tmp_path / "out" / "spa.json").read_text())
    assert spa["setting"] == "B0Inc2" and len(spa["curve"]) == 3  # 3 tasks of 2 classes, not 6 of 1
    saved = json.loads((tmp_path / "out" / "class_descriptions.json").read_text())
    assert saved["descriptions"]["blue square"] == ["a photo of a blue square."] and "blue_square" not in saved["descriptions"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["descriptions"] == "templates"


def test_custom_imagefolder_end_to_end(tmp_path):
    root = draw_folder(tmp_path / "discs")
    feats = cli("features", "--dataset", root, cwd=tmp_path)
    assert feats.returncode == 0, feats.stderr[-3000:]
    assert "discs train: 18 images" in feats.stdout and "discs test: 9 images" in feats.stdout
    p = cli("run", "--dataset", root, "--descriptions", "templates", "--methods", "spa,zeroshot,ncm", "--epochs", "1",
            "--out", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "features discs" not in p.stderr  # `features` filled the cache the run reads
    spa = json.loads((tmp_path / "out" / "spa.json").read_text())
    assert (spa["benchmark"], spa["setting"], len(spa["curve"])) == ("discs", "B0Inc1", 3)
    assert re.search(r"^\| spa † \| discs \| B0Inc1 \| 3 \| " + f"{spa['average']:.2f}", p.stdout, re.M)
    descs = json.loads((tmp_path / "out" / "class_descriptions.json").read_text())["descriptions"]
    assert descs == {c: [f"a photo of a {c}."] for c in ("red", "green", "blue")}


def test_bench_tries_a_missing_benchmark_once_for_all_its_settings(tmp_path):
    "One attempt and one error line per benchmark whose data is missing (an offline hub retries for ~30 s a try)."
    p = cli("bench", "--datasets", "cub", "--settings", "b0,bx", "--methods", "ncm", "--descriptions", "templates",
            "--data-root", tmp_path / "data", "--out", tmp_path / "suite", cwd=tmp_path)
    check_user_error(p, "2 benchmark setting(s) did not run: cub b0, cub bx")
    assert len(re.findall(r"^error: cub b0 bx: benchmark folder \S+ not found", p.stderr, re.M)) == 1, p.stderr


def test_bench_runs_what_it_can_and_names_what_it_cannot(tmp_path):
    args = ("bench", "--datasets", "synthetic,cub", "--settings", "b0", "--methods", "zeroshot,ncm",
            "--descriptions", "templates", "--data-root", tmp_path / "data", "--out", tmp_path / "suite")
    p = cli(*args, cwd=tmp_path)
    check_user_error(p, "1 benchmark setting(s) did not run: cub b0")
    assert re.search(r"error: cub b0: benchmark folder \S+/data/cub not found: expected layout", p.stderr)
    assert "| synthetic | B0Inc4 | ncm |" in p.stdout
    rows = json.loads((tmp_path / "suite" / "bench.json").read_text())
    assert [(r["benchmark"], r["ours"]) for r in rows] == [("synthetic", "zeroshot"), ("synthetic", "ncm")]
    assert [r["settings"] for r in rows] == ["the run's knobs"] * 2
    assert (tmp_path / "suite" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    again = cli(*args, cwd=tmp_path)
    assert "ncm: " not in again.stderr and "| synthetic | B0Inc4 | ncm |" in again.stdout  # resumed: nothing rerun


def test_bench_marks_each_peer_row_with_the_settings_it_ran(tmp_path):
    "A peer without a record on this setting says so in bench.md, bench.json and the printed table."
    p = cli("bench", "--datasets", "synthetic", "--settings", "b0", "--methods", "ncm,proof", "--set", "proof.epochs=1",
            "--descriptions", "templates", "--out", tmp_path / "suite", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "suite" / "bench.json").read_text())
    assert [(r["ours"], r["settings"]) for r in rows] == [("ncm", "the run's knobs"), ("proof", "defaults: no record")]
    md = (tmp_path / "suite" / "bench.md").read_text()
    assert md.splitlines()[0].endswith("| our settings |") and "| defaults: no record |" in md
    assert re.search(r"^\| synthetic \| B0Inc4 \| proof \|.*\| defaults: no record \|$", p.stdout, re.M), p.stdout
    run = json.loads(next((tmp_path / "suite").glob("synthetic-B0Inc4-*/run.json")).read_text())
    assert run["settings"]["proof"] == {"source": "run"}  # what the row was read from


@pytest.fixture(scope="module")
def stub():
    with StubOpenAI() as s: yield s


def test_describe_with_any_litellm_model_then_run_with_the_file(tmp_path, stub):
    args = ("describe", "--llm", "openai/stub-vlm", "--api-base", stub.api_base, "--k-exemplars", "2")
    p = cli(*args, cwd=tmp_path, OPENAI_API_KEY="sk-test")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "24 classes (0 from cache), 24 LLM calls" in p.stdout
    assert len(stub.requests) == 24 and all(len(image_urls(r["body"])) == 2 for r in stub.requests)
    again = cli(*args, cwd=tmp_path, OPENAI_API_KEY="sk-test")
    assert "24 classes (24 from cache), 0 LLM calls" in again.stdout and len(stub.requests) == 24
    path = re.search(r"descriptions written to (\S+)", p.stdout)[1]
    run = cli("run", "--methods", "descriptions", "--descriptions", path, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trait 0" in (tmp_path / out_folder(run.stdout) / "class_descriptions.json").read_text()


@pytest.mark.parametrize("args, needles", [
    (["run", "--dataset", "cub", "--data-root", "nodata"], ["nodata/cub not found", "expected layout", "PROOF"]),
    (["run", "--dataset", "cub"], ["SPA_DATA_ROOT"]),
    (["run", "--dataset", "cifar100"], ["could not load uoft-cs/cifar100", "network"]),
    (["run", "--methods", "zeroshot", "--arch", "ViT-B-16", "--pretrained", "laion400m_e32"], ["could not get weights", "network access"]),
    (["run", "--descriptions", "llm:gpt-4o-mini"], ["no API key", "OPENAI_API_KEY", "--descriptions templates"]),
    (["describe", "--llm", "gemini/gemini-1.5-flash"], ["no API key", "GEMINI_API_KEY"]),
    (["run", "--dataset", "cifar1000"], ["unknown benchmark 'cifar1000'", "cifar100"]),
    (["run", "--setting", "B5Inc7"], ["does not fit 24 classes", "B0Inc"]),
    (["run", "--setting", "half"], ["bad setting 'half'", "B0Inc10"]),
    (["run", "--arch", "ViT-Q-99", "--pretrained", "x"], ["unknown open_clip architecture 'ViT-Q-99'"]),
    (["run", "--arch", "ViT-B-16", "--pretrained", "nosuchtag"], ["unknown pretrained tag 'nosuchtag'", "laion400m_e32"]),
    (["run", "--methods", "spa,l2p"], ["unknown method(s) ['l2p']", "spa_nocal", "engine"]),
    (["run", "--epochs", "-1"], ["epochs=-1 is too small"]),
    (["run", "--k-patches", "four"], ["argument --k-patches: expected int, got 'four'"]),
    (["bench", "--datasets", "cifar1000"], ["unknown benchmark(s) ['cifar1000']"]),
    (["run", "--class-order-seed", "-1"], ["--class-order-seed -1 is out of range", ">= 0"]),
    (["run", "--extract-batch-size", "0"], ["--extract-batch-size 0 is out of range", ">= 1"]),
    (["features", "--num-workers", "-1"], ["--num-workers -1 is out of range", ">= 0"]),
    (["run", "--out", "afile/run"], ["afile is a file, not a folder"]),
    (["bench", "--out", "afile/suite"], ["afile is a file, not a folder"]),
    (["run", "--cache-dir", "afile/cache"], ["afile is a file, not a folder"]),
    (["run", "--out", "ro/run"], ["cannot write in", "ro"]),
    (["run", "--methods", "spa", "--k-patches", "100000"], ["--k-patches 100000 is more than the", "patches per image"]),
])
def test_user_errors_are_one_line_with_the_fix(tmp_path, args, needles):
    draw_folder(tmp_path / "discs", n_train=2, n_test=1)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "ro").mkdir(mode=0o555)
    if "ro/run" in args and os.access(tmp_path / "ro", os.W_OK): pytest.skip("this user can write anywhere (root)")
    p = cli(*args, cwd=tmp_path)
    check_user_error(p, *needles)
    assert "features " not in p.stderr  # refused before any work


def test_cached_features_do_not_hide_bad_options(tmp_path):
    "With every feature cached, bad extraction options are still refused (they used to pass unseen)."
    assert cli("features", cwd=tmp_path).returncode == 0
    for opt, v in (("--num-workers", "-1"), ("--extract-batch-size", "0")):
        check_user_error(cli("run", "--methods", "ncm", opt, v, cwd=tmp_path), f"{opt} {v} is out of range")


def test_version(tmp_path):
    from spa_toolkit import __version__
    p = cli("--version", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == f"spa_toolkit {__version__}", (p.stdout, p.stderr)


def test_rerun_into_an_existing_out_needs_resume(tmp_path):
    out = tmp_path / "out"
    assert cli("run", "--methods", "ncm,zeroshot", "--out", out, cwd=tmp_path).returncode == 0
    again = cli("run", "--methods", "ncm", "--out", out, cwd=tmp_path)
    check_user_error(again, f"{out} already holds a run: pass --resume")
    assert (out / "zeroshot.json").exists()  # nothing touched
    derived = cli("run", "--methods", "ncm", cwd=tmp_path)
    assert derived.returncode == 0, derived.stderr[-2000:]
    same = cli("run", "--methods", "ncm", cwd=tmp_path)  # the same derived folder: its finished run, reported again (issue 30)
    assert same.returncode == 0 and same.stdout == derived.stdout, same.stderr[-2000:]


def test_output_files_honour_the_umask(tmp_path):
    code = ("import os, sys; os.umask(0o022); from spa_toolkit.cli import main; "
            f"sys.exit(main(['run', '--methods', 'ncm', '--out', {str(tmp_path / 'run')!r}]))")
    e = {k: v for k, v in os.environ.items() if k not in SECRETS} | OFFLINE | dict(HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "run").iterdir()}
    assert modes and set(modes.values()) == {"0o644"}, modes


def test_corrupt_image_with_workers_is_one_line(tmp_path):
    root = draw_folder(tmp_path / "bad", classes=("red", "green"), n_train=2, n_test=1)
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    p = cli("features", "--dataset", root, "--num-workers", "2", cwd=tmp_path)
    check_user_error(p, f"cannot decode image {root}/train/red/broken.png", "replace it")
    assert "DataLoader worker" not in p.stderr, p.stderr[-3000:]  # the worker's traceback is not shown


def test_help_explains_the_settings(tmp_path):
    for cmd in ("run", "bench"):
        text = " ".join(cli(cmd, "--help", cwd=tmp_path).stdout.split())
        assert "b0 (default): zero base" in text and "bx: half the classes in the first task" in text, text


def test_run_without_matplotlib_writes_everything_but_the_figure(tmp_path):
    "`pip install -e .` has no matplotlib (the `plot` extra): the run still succeeds and says how to get curves.png."
    code = ("import sys; sys.modules['matplotlib'] = None; from spa_toolkit.cli import main; "
            f"sys.exit(main(['run', '--methods', 'ncm', '--out', {str(tmp_path / 'run')!r}]))")
    e = {k: v for k, v in os.environ.items() if k not in SECRETS} | OFFLINE | dict(HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "run" / "ncm.json").exists() and not (tmp_path / "run" / "curves.png").exists()
    assert "spa_toolkit[plot]" in p.stderr
