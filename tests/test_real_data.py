"""The README's real-data commands, run as written (device and model aside) on small local stand-ins of the real data:
a `datasets` copy of CIFAR-100, the authors' CUB tree, ENGINE's description files; the embedded micro-CLIP as backbone."""
import json, re, shlex
from pathlib import Path

import pytest
from PIL import Image

from spa_toolkit.catalog import benchmark_info, registry_class_names
from spa_toolkit.descriptions import save_descriptions
from spa_toolkit.microclip import embedded_clip_path

from test_cli import check_user_error, cli
from test_data import hub_copy, id_tree

README = Path(__file__).resolve().parent.parent / "README.md"
MODEL = ("--arch", f"local-dir:{embedded_clip_path()}")
FAST = ("--methods", "descriptions,ncm", "--epochs", "1")


def readme_commands() -> dict[str, list[str]]:
    "subcommand -> its arguments, from the README's shell block, comments dropped."
    lines = re.findall(r"^python -m spa_toolkit\.cli (.+)$", README.read_text(), re.M)
    return {a[0]: a for a in (shlex.split(l.split("  #")[0]) for l in lines)}


def engine_file(path: Path, names: list[str]):
    "A descriptions file in ENGINE's format: class -> other class -> sentences."
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({c: {o: [f"Typically {c} shaped.", f"Unlike a {o}, smooth."] for o in names[:2]} for c in names}))


def as_written(args: list[str], data: Path) -> list[str]:
    "A README command with this machine's device and data root."
    return [{"cuda": "cpu", "~/data": str(data)}.get(a, a) for a in args]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    "A data root with CIFAR-100 as a `datasets` copy and CUB as the authors' tree, and ENGINE's chat/ files."
    root = tmp_path_factory.mktemp("real")
    hub_copy(n_per_class=2).save_to_disk(str(root / "data" / "cifar100"))
    cub = registry_class_names(benchmark_info("cub"))
    id_tree(root / "data" / "cub", [f"{i + 1:03d}.{c.replace(' ', '_')}" for i, c in enumerate(cub)], range(200), n=2)
    engine_file(root / "chat" / "cifar224_des.json", registry_class_names(benchmark_info("cifar100")))
    engine_file(root / "chat" / "cub_des.json", cub)
    return root


def test_readme_commands_are_the_ones_exercised():
    cmds = readme_commands()
    assert set(cmds) == {"features", "run", "bench", "study"}
    assert "--descriptions" in cmds["bench"] and "{key}" in " ".join(cmds["bench"])


def test_readme_features_and_run_on_a_saved_cifar_copy(stand_ins):
    cmds, env = readme_commands(), dict(SPA_DATA_ROOT=str(stand_ins / "data"))
    feats = cli(*as_written(cmds["features"], stand_ins / "data"), *MODEL, cwd=stand_ins, **env)
    assert feats.returncode == 0, feats.stderr[-3000:]
    assert "cifar100 train: 200 images" in feats.stdout and "cifar100 test: 200 images" in feats.stdout
    engine_file(stand_ins / "descriptions.json", registry_class_names(benchmark_info("cifar100")))
    run = cli(*as_written(cmds["run"], stand_ins / "data"), *MODEL, *FAST, "--out", stand_ins / "run", cwd=stand_ins, **env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "features cifar100" not in run.stderr  # the cache `features` filled
    meta = json.loads((stand_ins / "run" / "run.json").read_text())
    assert meta["model"]["precision"] == "fp32" and meta["class_folders"]["cra"] == "crab"
    descs = json.loads((stand_ins / "run" / "class_descriptions.json").read_text())["descriptions"]
    assert "Typically apple shaped." in descs["apple"]  # ENGINE's sentences, pooled


def test_readme_bench_with_engine_files(stand_ins):
    args = as_written(readme_commands()["bench"], stand_ins / "data")
    p = cli(*args, *MODEL, *FAST, "--datasets", "cifar100,cub", "--settings", "b0", "--out", stand_ins / "suite", cwd=stand_ins)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| cifar100 | B0Inc10 | ncm |" in p.stdout and "| cub | B0Inc20 | ncm |" in p.stdout
    assert p.stdout.startswith("backbone: embedded micro-CLIP") and "premise world" in p.stdout.splitlines()[0]  # the suite names its model
    cub_run = next((stand_ins / "suite").glob("cub-B0Inc20-*"))
    folders = json.loads((cub_run / "run.json").read_text())["class_folders"]
    assert folders["001.Black_footed_Albatross"] == "Black footed Albatross"


def test_readme_study_on_a_saved_cifar_copy(stand_ins):
    "The README's `study` as written, on two rows of the grid and one epoch: three seeds, paired against SPA."
    args, env = as_written(readme_commands()["study"], stand_ins / "data"), dict(SPA_DATA_ROOT=str(stand_ins / "data"))
    engine_file(stand_ins / "descriptions.json", registry_class_names(benchmark_info("cifar100")))
    p = cli(*args, *MODEL, "--configs", "spa,ncm", "--epochs", "1", "--out", stand_ins / "study", cwd=stand_ins, **env)
    assert p.returncode == 0, p.stderr[-3000:]
    body = json.loads((stand_ins / "study" / "study.json").read_text())
    assert "ncm" in p.stdout and (stand_ins / "study" / "study.md").exists()
    assert {(r["config"], r["seed"]) for r in body["rows"]} == {(c, s) for c in ("spa", "ncm") for s in (0, 1, 2)}


def test_a_tree_naming_other_classes_is_refused_in_one_line(tmp_path):
    id_tree(tmp_path / "data" / "cub", [f"bird_{i}" for i in range(200)], range(200))
    p = cli("features", "--dataset", "cub", "--data-root", tmp_path / "data", *MODEL, cwd=tmp_path)
    check_user_error(p, "200 class folder(s) match no class name of the protocol", "rename them")
