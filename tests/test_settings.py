"""The settings records against the reference table they were read from (shared/reference/peer_settings.md, itself read
from the authors' files), and their resolution into knobs: every record's values reach the knobs or are reported."""
import re
from pathlib import Path

import pytest

from spa_toolkit.catalog import BENCHMARKS
from spa_toolkit.settings import KEYS, author_knobs, settings_records

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "peer_settings.md"
num = lambda s: float(s.strip("* ")) if re.fullmatch(r"[\d.]+", s.strip("* ")) else s.strip("* ")


def table(section: str) -> list[list[str]]:
    "The body rows of the first markdown table after the heading that starts with `section`."
    text = REF.read_text().split(f"## {section}", 1)[1]
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("|"))
    rows = lines[start:start + next(i for i, l in enumerate(lines[start:] + [""]) if not l.startswith("|"))]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


@pytest.fixture(scope="module")
def by_file():
    if not REF.exists(): pytest.skip("shared/reference is not beside this checkout")
    return {r.file.split(" ", 1)[1]: r for r in settings_records()}


def test_proof_records_equal_the_reference(by_file):
    rows = table("PROOF")
    assert len(rows) == 18
    for f, _, _, epochs, batch, lr, opt, mem, fixed in rows:
        a = by_file[f"exps/{f}"].authors
        assert (a["tuned_epoch"], a["batch_size"], a["init_lr"], a["optimizer"], a["memory_size"]) == \
               (num(epochs), num(batch), num(lr), opt.strip("*"), num(mem)), f
        assert a["fixed_memory"] == fixed.startswith("true"), f
        if a["fixed_memory"]: assert a["memory_per_class"] == int(re.search(r"\((\d+)\)", fixed)[1]), f


def test_engine_records_equal_the_reference(by_file):
    rows = table("ENGINE")
    seen = 0
    for files, aug, rerank, noise, stat, _ in rows:
        for f in files.split(" / "):
            a = by_file[f"exps/engine/{f}.json"].authors
            assert (a["image_aug"], a["rerank"], a["sample_noise"], a["stat"]) == tuple(map(num, (aug, rerank, noise, stat))), f
            seen += 1
    assert seen == 18


def test_rapf_records_equal_the_reference(by_file):
    for files, batches, beta, mix, thr, shrink, margin in table("RAPF"):
        for f in files.split(", "):
            if f"configs/class/{f}.yaml" not in by_file: continue  # cifar100_50-5: a setting the protocol does not run
            a = by_file[f"configs/class/{f}.yaml"].authors
            assert (a["train_batch_size"], a["beta"], a["mix_bias"], a["threshold"]) == \
                   (num(batches.split("/")[1]), num(beta), num(mix), num(thr)), f
            assert a["shrinkage"] == (shrink.strip("*") == "true"), f
            assert a.get("margin", 0.1) == float(re.search(r"[\d.]+", margin or "0.1")[0]), f  # "(default 0.1)", or blank


def test_pilot_records_cite_the_authors_files(by_file):
    "RanPAC and FeCAM have no table in the reference, which names their code: LAMDA-PILOT's exps files, one per benchmark."
    assert "LAMDA-CL/LAMDA-PILOT `models/ranpac.py`, `models/fecam.py`" in REF.read_text()
    for m in ("ranpac", "fecam"):
        files = {r.benchmark: r.file for r in settings_records() if r.method == m}
        assert files == {"cifar100": f"LAMDA-CL/LAMDA-PILOT exps/{m}.json",
                         "imagenetr": f"LAMDA-CL/LAMDA-PILOT exps/{m}_inr.json"}
    for f in ("exps/ranpac.json", "exps/ranpac_inr.json"):
        assert (by_file[f].authors["M"], by_file[f].authors["use_RP"]) == (10000, True)
    assert (by_file["exps/fecam_inr.json"].authors["batch_size"], by_file["exps/fecam.json"].authors["tuned_epoch"]) == (16, 20)


AREA_MIRROR = Path("/work/.mirror/LAMDA-CL+ICML2026-AREA/repo")


def test_area_records_equal_the_authors_files():
    """AREA's 18 records against exps/area/*.json of the authors' repository (no table in the reference yet): every key
    models/area.py reads, as written; a file's B{init}Inc{inc} from its init_cls and increment."""
    import json, subprocess
    recs = [r for r in settings_records() if r.method == "area"]
    assert len(recs) == 18 and len({(r.benchmark, r.setting) for r in recs}) == 18
    assert {(i.name, s) for i in BENCHMARKS for s in (i.setting_b0, i.setting_bx)} == {(r.benchmark, r.setting) for r in recs}
    if not AREA_MIRROR.is_dir(): pytest.skip("the authors' AREA repository is not mirrored here")
    for r in recs:
        path = r.file.split(" ", 1)[1]
        a = json.loads(subprocess.run(["git", "-C", str(AREA_MIRROR), "show", f"HEAD:{path}"], capture_output=True,
                                      text=True, check=True).stdout)
        assert r.authors == {k: a[k] for k in KEYS["area"] if k in a}, path
        inc = a["increment"]
        assert r.setting == (f"B0Inc{inc}" if a["init_cls"] == inc else f"B{a['init_cls']}Inc{inc}"), path
    cifar50 = author_knobs("area", "cifar100", "B50Inc10")
    assert (cifar50.knobs.epochs, cifar50.knobs.milestones, cifar50.unexpressed) == (20, (7, 15), {})  # their defaults


def test_every_record_resolves_into_its_knobs_or_reports_what_it_cannot():
    "Each authors' value either reaches the knob KEYS names, or is listed as unexpressed (nothing dropped silently)."
    for r in settings_records():
        got = author_knobs(r.method, r.benchmark, r.setting, r.source)
        assert got.record == r
        for key, value in r.authors.items():
            knob = KEYS[r.method][key] or "memory_per_class"
            if key == "fixed_memory": continue
            value = tuple(value) if isinstance(value, list) else value  # knobs hold tuples
            if hasattr(got.knobs, knob): assert getattr(got.knobs, knob) == value, (r.file, key)
            else: assert got.unexpressed.get(knob, value) == value, (r.file, key)


def test_every_benchmark_setting_has_the_three_peers():
    for info in BENCHMARKS:
        for s in (info.setting_b0, info.setting_bx):
            for m in ("proof", "engine", "rapf"):
                assert author_knobs(m, info.name, s).record is not None, (m, info.name, s)


def test_knobs_command_prints_the_resolved_knobs(capsys):
    import json
    from spa_toolkit.cli import main
    assert main(["knobs", "--method", "proof", "--dataset", "imagenetr", "--setting", "B0Inc20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["knobs"]["batch_size"], out["knobs"]["memory_size"], out["file"]) == (48, 4000, "zhoudw-zdw/PROOF exps/img.json")
    assert main(["knobs", "--method", "engine", "--dataset", "ucf101"]) == 0  # b0 by default
    out = json.loads(capsys.readouterr().out)
    assert (out["setting"], out["knobs"]["sample_noise"]) == ("B0Inc10", 0)
    assert main(["knobs", "--method", "rapf", "--dataset", "cub", "--settings-source", "authors",
                 "--set", "rapf.epochs=3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["knobs"]["epochs"], out["knobs"]["beta"], out["knobs"]["shrinkage"], out["unexpressed"]) == (3, 1, True, {})
    assert main(["knobs", "--method", "proof", "--dataset", "cub", "--set", "proof.epoch=2"]) == 2
    assert "proof has no knob 'epoch'" in capsys.readouterr().err


def test_knobs_command_prints_the_issues_examples(capsys):
    "Issue 26's examples, and an authors' folder name (ENGINE's `ucf`) reading the same record as our name."
    import json
    from spa_toolkit.cli import main
    def knobs(*args):
        assert main(["knobs", *args]) == 0
        return json.loads(capsys.readouterr().out)
    o = knobs("--method", "proof", "--dataset", "cub", "--setting", "B0Inc20")
    assert (o["knobs"]["epochs"], o["knobs"]["memory_per_class"], o["file"]) == (10, 20, "zhoudw-zdw/PROOF exps/cub.json")
    o = knobs("--method", "proof", "--dataset", "imagenetr", "--setting", "B0Inc20")
    assert (o["knobs"]["batch_size"], o["knobs"]["memory_size"], o["knobs"]["memory_per_class"]) == (48, 4000, None)
    for name in ("ucf101", "ucf"):
        o = knobs("--method", "engine", "--dataset", name, "--setting", "B0Inc10")
        assert (o["benchmark"], o["knobs"]["sample_noise"], o["file"]) == \
               ("ucf101", 0, "LAMDA-CL/ICCV25-ENGINE exps/engine/ucf_0_10.json"), name
    o = knobs("--method", "rapf", "--dataset", "cub", "--setting", "B0Inc20", "--settings-source", "authors")
    k = o["knobs"]
    assert (k["shrinkage"], k["beta"], k["mix_bias"], k["threshold"], k["margin"]) == (True, 1, 0.8, 0.65, 0.2)
    o = knobs("--method", "rapf", "--dataset", "cub", "--setting", "B0Inc20")  # the tables' source: C3Box's re-run
    assert (o["source"], o["knobs"]["shrinkage"], o["knobs"]["beta"]) == ("c3box", False, 2)
    o = knobs("--method", "proof")  # the default dataset, synthetic: no record
    assert (o["benchmark"], o["source"], o["knobs"]["epochs"]) == ("synthetic", "defaults", 5)


def test_bench_rows_name_the_record_each_peer_ran(tmp_path):
    "The bench table's last column (bench.md, bench.json) is the record the run followed, not a re-resolution."
    import json
    from spa_toolkit.metrics import RunResult
    from spa_toolkit.runs import bench_rows, settings_notes, write_suite
    methods = ["proof", "engine", "rapf", "clg_cbm", "spa"]
    res = {("cub", "B0Inc20"): {m: RunResult(m, "cub", "B0Inc20", [90.0, 80.0], [], [20, 40], []) for m in methods}}
    ran = {("cub", "B0Inc20"): settings_notes(methods, "cub", "B0Inc20", "authors")}  # as run.json records them
    rows = write_suite(res, tmp_path, ran)
    want = {"proof": "authors: zhoudw-zdw/PROOF exps/cub.json",
            "engine": "authors: LAMDA-CL/ICCV25-ENGINE exps/engine/cub_0_20.json",
            "rapf": "authors: linlany/RAPF configs/class/cub200_20-20.yaml",  # RAPF's own runs, as asked
            "clg_cbm": "defaults: no record", "spa": "the run's knobs"}
    assert {r.ours: r.settings for r in rows} == want
    assert {r["ours"]: r["settings"] for r in json.loads((tmp_path / "bench.json").read_text())} == want
    md = (tmp_path / "bench.md").read_text().splitlines()
    assert md[0].endswith("| our settings |") and len(md[2].split(" | ")) == len(md[0].split(" | "))
    assert all(line.endswith(f"| {want[line.split(' | ')[2]]} |") for line in md[2:])
    # without the run's notes, the default resolution: RAPF follows C3Box's re-run
    assert {r.ours: r.settings for r in bench_rows(res)}["rapf"] == "c3box re-run: LAMDA-CL/C3Box exps/rapf.json"
