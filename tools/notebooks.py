"""Run the notebooks and save their outputs (`--write`), or check that the saved outputs are the ones the code produces now (`--check`).

The notebooks are committed with their outputs, so they read as documentation on a code host without running them.
Both modes run each notebook as `nbdev_test` does (execnb's CaptureShell, in the notebook's folder, the project root on
`sys.path`, `IN_TEST=1`, stopping at the first error), two notebooks at a time, each in a fresh interpreter: what a notebook
prints then cannot depend on which notebooks ran before it in the same process (a warning is shown once per process).
A code cell is not run when its `#|` directives hold a flag of settings.ini `tst_flags` (slow gpu llm) not asked for with
`--flags`, `eval: false`, or when it calls `nbdev_export(`; such a cell keeps the outputs it has. A cell run because of
`--flags` gets a first stdout line saying when and where it last ran
(`[last run 2026-12-01 on AMD EPYC, 2 CPU cores, no GPU; torch 2.14.1; 41 s]`).
A cell whose output legitimately varies (a timing) carries a `#| volatile` directive: it runs and its output is saved, but
`--check` does not compare it.

`--check` compares each cell it ran with its saved outputs after removing only what carries no meaning: execution counts,
object addresses (`<... at 0x...>`, as `nbdev_clean` does), ANSI colour codes and trailing whitespace. Numbers are compared
as printed; images byte for byte (matplotlib's PNGs are byte-identical run to run here). Cells run with `--flags` are compared
too, their "last run" line aside.
Usage:
  python tools/notebooks.py --write [NB ...] [--flags "slow gpu"]   run and save outputs (all of nbs/ by default)
  python tools/notebooks.py --check [NB ...]                         exit 1 naming each stale cell, or on an error
The written file is what `nbdev_clean` writes (sorted keys, indent 1, UTF-8, trailing newline), so cleaning leaves it as is.
"""
import argparse, copy, datetime, difflib, hashlib, json, os, platform, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

root = Path(__file__).resolve().parent.parent
VOLATILE = "volatile"                                       # the directive that excludes a cell from --check
STAMP = "[last run "                                        # how the note on a flagged cell's first output begins
_ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# As CI and tests/conftest.py run: offline, no remote price map, one torch thread per process (two notebooks share two cores).
ENV = dict(OMP_NUM_THREADS="1", LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")

def config():
    "The project's nbdev settings (settings.ini at the repository root)."
    from nbdev.config import get_config
    return get_config(path=root)

def find_notebooks(paths=()):
    "Notebooks named in `paths` (files or folders), or all of nbs/; skips `_`/`.` names and `.notest` folders as nbdev_test does."
    from fastcore.xtras import globtastic
    cfg, found = config(), []
    for p in [Path(p).resolve() for p in paths] or [cfg.path("nbs_path")]:
        found += [p] if p.is_file() else globtastic(p, file_glob="*.ipynb", skip_folder_re="^[_.]", skip_file_re="^[_.]",
                                                    recursive=cfg.recursive).map(Path)
    return sorted(p for p in set(found) if not (p.parent / ".notest").exists())

def directives(src):
    "The `#|` directives heading a cell (`{name: [args]}`) and the source nbdev_test runs (nbdev-only directives removed)."
    from fastcore.basics import AttrDict
    from nbdev.process import extract_directives
    cell = AttrDict(source=src)
    return extract_directives(cell), cell.source

def plan(cell, run_flags=()):
    "What a cell gets: 'run', 'flagged' (run because `run_flags` asks for its flags) or 'skip' (not run, outputs kept)."
    src = "".join(cell.get("source", []))
    if cell["cell_type"] != "code" or "nbdev_export" + "(" in src: return "skip"
    d, _ = directives(src)
    if d.get("eval:", [""])[0].lower() == "false": return "skip"
    flags = set(config().tst_flags.split()) & d.keys()
    if flags - set(run_flags): return "skip"
    return "flagged" if flags else "run"

def is_volatile(cell): return VOLATILE in directives("".join(cell.get("source", [])))[0]

def first_line(cell):
    "The first line of a cell's code, directives left out."
    lines = "".join(cell.get("source", [])).splitlines()
    return next((l for l in lines if l.strip() and not l.startswith("#|")), lines[0] if lines else "")

def machine():
    "Where this runs, in words: CPU model and cores, GPUs, torch version."
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")),
               None) if Path("/proc/cpuinfo").exists() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    if shutil.which("nvidia-smi"):
        try: gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                                   timeout=20).stdout.split("\n")
        except (OSError, subprocess.SubprocessError): pass
    gpus = [g.strip() for g in gpus if g.strip()]
    gpu = f"{len(gpus)}x {gpus[0]}" if gpus else "no GPU"
    try: torch = f"; torch {metadata.version('torch')}"
    except metadata.PackageNotFoundError: torch = ""
    return f"{cpu or platform.processor() or platform.machine()}, {cores} CPU cores, {gpu}{torch}"

def stamp_output(seconds, where):
    "The stdout output that heads a flagged cell's outputs: when and where it last ran, and how long it took."
    return {"name": "stdout", "output_type": "stream",
            "text": [f"{STAMP}{datetime.date.today().isoformat()} on {where}; {seconds:.0f} s]\n"]}

def is_stamp(o): return o.get("output_type") == "stream" and "".join(o.get("text", "")).startswith(STAMP)

def execute(path, run_flags=()):
    "Run notebook `path` as nbdev_test does; {'outputs': {cell index: outputs}, 'seconds': {index: s}, 'error': str|None}."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor, nb_lang
    path, res = Path(path), {"outputs": {}, "seconds": {}, "error": None}
    nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb
    if str(getattr(nb, "frontmatter_", {}).get("skip_exec", "")).lower() in ("true", "1") or nb_lang(nb) != "python": return res
    for k, v in ENV.items(): os.environ.setdefault(k, v)
    os.environ["IN_TEST"] = "1"
    if str(root) not in sys.path: sys.path.insert(0, str(root))
    cwd, shell = os.getcwd(), CaptureShell(path)
    os.chdir(path.parent)
    try:
        for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            if plan(cell, run_flags) == "skip": continue
            start = time.time()
            outs = shell.run(directives("".join(cell["source"]))[1])
            res["outputs"][i], res["seconds"][i] = json.loads(json.dumps(list(outs))), time.time() - start
            if shell.exc:
                shell._cell_idx = i + 1
                res["error"] = shell.prettytb(fname=path)
                break
    finally: os.chdir(cwd)
    return res

def _execute(args):
    "`execute` that never raises (what a fresh process runs)."
    path, run_flags = args
    try: return execute(path, run_flags)
    except BaseException as e: return {"outputs": {}, "seconds": {}, "error": f"{type(e).__name__} running {path}: {e}"}

def clean(nb):
    "`nb` as `nbdev_clean` leaves it (counts cleared, object addresses removed, metadata filtered), in place."
    from nbdev.clean import clean_nb
    cfg = config()
    clean_nb(nb, cfg.clear_all, cfg.get("allowed_metadata_keys", "").split(), cfg.get("allowed_cell_metadata_keys", "").split(),
             cfg.clean_ids)
    return nb

def merge(nb, res, run_flags=(), where=None):
    "A copy of notebook dict `nb` with the fresh outputs of `res`; flagged cells get the stamp first; cleaned as nbdev_clean does."
    nb = copy.deepcopy(nb)
    for i, outs in res["outputs"].items():
        cell = nb["cells"][int(i)]
        stamp = [stamp_output(res["seconds"][i], where or machine())] if plan(cell, run_flags) == "flagged" else []
        cell["outputs"], cell["execution_count"] = stamp + outs, None
    return clean(nb)

def canonical(outputs):
    "Outputs as comparable lines: stamps dropped, streams joined, ANSI codes and trailing spaces removed, images hashed."
    lines, prev = [], None
    for o in outputs:
        if is_stamp(o): continue
        kind = o["output_type"]
        if kind == "stream":
            if prev != o["name"]: lines.append(f"[{o['name']}]")
            lines += "".join(o["text"]).splitlines()
            prev = o["name"]; continue
        prev = None
        if kind == "error": lines += [f"[error] {o['ename']}: {o['evalue']}"]; continue
        lines.append(f"[{kind}]")
        for mime, v in sorted(o.get("data", {}).items()):
            if isinstance(v, list): v = "".join(v)
            if not isinstance(v, str): v = json.dumps(v, sort_keys=True)
            if mime.startswith("image/") and "svg" not in mime:
                data = v.strip()
                lines.append(f"<{mime} {len(data)} base64 chars, sha256 {hashlib.sha256(data.encode()).hexdigest()[:16]}>")
            else: lines += [f"<{mime}>"] + v.splitlines()
        if o.get("metadata"): lines.append(f"<metadata {json.dumps(o['metadata'], sort_keys=True)}>")
    return [_ansi.sub("", l).rstrip() for l in lines]

def stale_cells(saved, fresh, res):
    "Cells run in `res` (volatile ones aside) whose canonical outputs differ: [(cell, saved lines, fresh lines)]."
    out = []
    for i in res["outputs"]:
        old, new = saved["cells"][int(i)], fresh["cells"][int(i)]
        if is_volatile(old): continue
        a, b = canonical(old.get("outputs", [])), canonical(new.get("outputs", []))
        if a != b: out.append((old, a, b))
    return out

def short_diff(a, b, n=10):
    "The first `n` lines of a unified diff of `a` to `b`."
    d = [l for l in difflib.unified_diff(a, b, "saved", "now", n=0, lineterm="") if not l.startswith(("---", "+++", "@@"))]
    return d[:n] + ([f"... ({len(d) - n} more diff lines)"] if len(d) > n else [])

def _fresh(job):
    "`_execute(job)` in a fresh interpreter, whose multiprocessing start method is the platform's own (as under nbdev_test)."
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        p = subprocess.run([sys.executable, __file__, "--execute-one", job[0], " ".join(job[1]), str(out)])
        if out.exists(): return json.loads(out.read_text())
        return {"outputs": {}, "seconds": {}, "error": f"the process running {job[0]} exited with status {p.returncode}"}

def run_all(paths, run_flags, workers):
    "Yield (path, result) per notebook in order: in this process for one notebook, else a fresh process each, `workers` at once."
    jobs = [(str(p), tuple(run_flags)) for p in paths]
    if len(jobs) == 1 or workers < 1:
        for j in jobs: yield Path(j[0]), _execute(j)
        return
    with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
        for j, res in zip(jobs, pool.map(_fresh, jobs)): yield Path(j[0]), res

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="run the notebooks and save their outputs")
    mode.add_argument("--check", action="store_true", help="run the notebooks and fail if a saved output is stale")
    p.add_argument("nbs", nargs="*", help="notebooks or folders (default: nbs/)")
    p.add_argument("--flags", default="", help="space-separated tst_flags whose cells also run (and get stamped)")
    p.add_argument("--workers", type=int, default=2, help="notebooks run at once (default 2)")
    a = p.parse_args(argv)
    run_flags, paths, failed, start = a.flags.split(), find_notebooks(a.nbs), [], time.time()
    where = machine() if run_flags else None
    for path, res in run_all(paths, run_flags, a.workers):
        name, secs = path.relative_to(root) if path.is_relative_to(root) else path, sum(res["seconds"].values())
        if res["error"]:
            failed.append(name); print(f"FAIL  {name}\n{res['error']}", file=sys.stderr); continue
        saved = json.loads(path.read_text(encoding="utf-8"))
        fresh = merge(saved, res, run_flags, where)
        stale = stale_cells(clean(copy.deepcopy(saved)), fresh, res)
        if a.write:
            from execnb.nbio import write_nb
            write_nb(fresh, path)
            print(f"wrote {name} ({len(stale)} cells changed, {secs:.0f} s)"); continue
        if not stale: print(f"ok    {name} ({secs:.0f} s)"); continue
        failed.append(name)
        for cell, old, new in stale:
            print(f"STALE {name} cell {cell.get('id', '?')}: {first_line(cell)[:80]}")
            print("\n".join("      " + l[:160] for l in short_diff(old, new)))
    print(f"{len(paths)} notebooks in {time.time() - start:.0f} s" + (f"; failed or stale: {', '.join(map(str, failed))}" if failed else ""))
    if failed and a.check: print("fix the failing notebooks; for stale outputs run `python tools/notebooks.py --write` and commit them", file=sys.stderr)
    return 1 if failed else 0

if __name__ == "__main__":
    if sys.argv[1:2] == ["--execute-one"]:  # internal: how `_fresh` runs one notebook
        path, flags, out = sys.argv[2:5]
        Path(out).write_text(json.dumps(_execute((path, tuple(flags.split())))))
    else: sys.exit(main())
