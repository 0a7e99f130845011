"""Run the pipeline notebooks in order through papermill, with scale presets, caching and a figure manifest.

Each notebook in `notebooks/` is one pipeline step. Its metadata may declare, under the key "lofa":
    outputs: files (relative to the run folder) the step must produce. Files under `figures/` get a manifest
             entry (with their sha256).
    depends: names of earlier notebooks whose results it reads (default: every earlier notebook).
The orchestrator injects the parameters `scale`, `device`, `seed` and `run_dir` into the cell tagged
`parameters`, writes the executed copy to `runs/<scale>/notebooks/` once it succeeded, and records a cache key
over the notebook's cells, the `lofa` sources it imports (transitively) and its parameters, chained with its
upstream keys, beside the files the step produced (`lofa.ledger`). A step is `cached` only when its key is
unchanged, its last run finished, every file it produced is still there with the recorded content, and the
manifest describes its figures as they are: a step interrupted, half done, or rerun by hand runs again.
"""
from __future__ import annotations

import ast
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lofa import ledger
from lofa.config import resolve_device
from lofa.errors import LofaError
from lofa.io import read_json, write_json
from lofa.kernel import NotebookFailed, execute
from lofa.provenance import REPO_DIR, device_description, git_commit, package_versions

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class NotebookSpec:
    path: Path
    outputs: list[str] = field(default_factory=list)
    depends: list[str] | None = None  # None = every earlier notebook
    minutes: dict[str, float] = field(default_factory=dict)  # expected wall minutes per scale (2 CPU cores)

    def expected_minutes(self, scale: str) -> float:
        """What the progress bar counts this notebook as: its measured minutes at `scale`, else 1."""
        return float(self.minutes.get(scale, 1.0))

    @property
    def name(self) -> str:
        return self.path.stem

    def outputs_for(self, tasks: tuple[str, ...]) -> list[str]:
        """The declared outputs a run of `tasks` produces: a file whose name holds a task's name (a gallery, a
        setting's figure: "01_styles_gallery.png", "07_fig4_actions_text.png") belongs to that task."""
        from lofa.config import for_tasks

        return [o for o in self.outputs if for_tasks(o, tasks)]


def discover(nb_dir: Path) -> list[NotebookSpec]:
    """The pipeline notebooks of `nb_dir`, in name order (they are numbered in pipeline order)."""
    specs = []
    for path in sorted(Path(nb_dir).glob("*.ipynb")):
        meta = json.loads(path.read_text()).get("metadata", {}).get("lofa", {})
        specs.append(NotebookSpec(path, list(meta.get("outputs", [])), meta.get("depends"), meta.get("minutes", {})))
    return specs


# ---------------------------------------------------------------- cache keys
def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    if not parts:
        return PACKAGE_DIR / "__init__.py"
    rel = Path(*parts)
    for cand in (PACKAGE_DIR / rel / "__init__.py", PACKAGE_DIR / rel.with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


def _lofa_imports(source: str, package: str = "") -> set[str]:
    """Names of `lofa` modules imported by `source` (absolute and relative imports, including `from x import y`
    where y is itself a module)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # notebook cells may hold IPython magics; skip what does not parse
        return set()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lofa"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "lofa":
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def lofa_sources(source: str) -> list[Path]:
    """Every lofa source file that `source` imports, transitively, including the packages' __init__ files."""
    todo, seen, files = list(_lofa_imports(source)), set(), set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run on import
        path = _module_file(mod)
        if path is None:
            continue
        files.add(path)
        pkg = mod if path.name == "__init__.py" else ".".join(parts[:-1])
        todo += list(_lofa_imports(path.read_text(), pkg))
    return sorted(files)


def _code_cells(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def cache_key(spec: NotebookSpec, params: dict, upstream: list[str]) -> str:
    nb = json.loads(spec.path.read_text())
    h = hashlib.sha256()
    h.update(json.dumps([(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]).encode())
    h.update(json.dumps(nb.get("metadata", {}).get("lofa", {}), sort_keys=True).encode())
    for f in lofa_sources(_code_cells(spec.path)):
        h.update(str(f.relative_to(PACKAGE_DIR)).encode() + f.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    for k in upstream:
        h.update(k.encode())
    return h.hexdigest()


@dataclass
class StepResult:
    name: str
    status: str  # "ran" | "cached"
    seconds: float
    outputs: list[str]
    reason: str = ""  # why it ran: "--force", or what made its cache invalid


def task_label(tasks: str | tuple[str, ...] = "all") -> str:
    """"all", or the selected tasks joined by "+" ("identities", "actions+styles"): the `tasks` parameter the
    notebooks receive and the name of a task subset's run and publication folders."""
    from lofa.config import TASKS
    from lofa.run import select_tasks

    selection = select_tasks(tasks)
    return "all" if selection == TASKS else "+".join(selection)


def run_folder(run_root: str | Path, scale: str, tasks: str | tuple[str, ...] = "all") -> Path:
    """RUN_ROOT/<scale>/ for a run of every task, RUN_ROOT/<scale>-<task label>/ for a run of some (a `full` run
    takes one task per GPU lease); a relative RUN_ROOT is taken from the repository."""
    root = Path(run_root) if Path(run_root).is_absolute() else REPO_DIR / run_root
    label = task_label(tasks)
    return root / (scale if label == "all" else f"{scale}-{label}")


def run(scale: str = "mini", only: list[str] | None = None, device: str = "auto", force: bool = False,
        seed: int = 0, run_root: str | Path = "runs", nb_dir: str | Path | None = None, progress: bool = True,
        log_output: bool = False, extra_params: dict | None = None,
        tasks: str | tuple[str, ...] = "all") -> list[StepResult]:
    """Run the pipeline at `scale` for `tasks` (all three, or some: `task_label`), in `run_folder`. Returns one
    StepResult per selected notebook.

    Raises NotebookFailed (a LofaError) naming the failing notebook and cell; the run stops there.
    """
    import dataclasses

    from lofa.config import SCALES
    from lofa.run import select_tasks

    if scale not in SCALES:
        raise LofaError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    nb_dir = Path(nb_dir) if nb_dir else REPO_DIR / "notebooks"
    selection = select_tasks(tasks)
    specs = [dataclasses.replace(s, outputs=s.outputs_for(selection)) for s in discover(nb_dir)]
    if not specs:
        raise LofaError(f"no notebooks found in {nb_dir}")
    names = [s.name for s in specs]
    selected = names if not only else [_match(o, names) for o in only]
    device = resolve_device(device)
    run_dir = run_folder(run_root, scale, tasks)
    # `tasks` only for a run of some: the notebooks default to all, and a run of all keeps the parameters (and
    # cache keys) it always had
    label = task_label(tasks)
    params = {"scale": scale, "device": device, "seed": seed, "run_dir": str(run_dir),
              **({"tasks": label} if label != "all" else {}), **(extra_params or {})}

    keys: dict[str, str] = {}
    for s in specs:  # every key, selected or not, so a changed upstream step invalidates what reads it
        ups = [keys[d] for d in (s.depends if s.depends is not None else list(keys)) if d in keys]
        keys[s.name] = cache_key(s, params, ups)

    from tqdm.auto import tqdm

    results = []
    # The bar counts expected minutes, not notebooks: the notebooks' costs differ by a factor of 100, so a bar
    # of notebooks would promise an ETA of seconds before the zoo's half hour.
    todo = [s for s in specs if s.name in selected]
    bar = tqdm(total=round(sum(s.expected_minutes(scale) for s in todo), 1), desc=f"lofa reproduce [{scale}]",
               unit="min", bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} expected min [{elapsed}<{remaining}] "
               "{postfix}", disable=not progress)
    try:
        for spec in todo:
            bar.set_postfix_str(f"{spec.name} (about {spec.expected_minutes(scale):.1f} min)")
            results.append(_step(spec, specs, keys, params, run_dir, selected, force, log_output))
            bar.update(spec.expected_minutes(scale))
    finally:
        bar.close()  # also on Ctrl-C, so the CLI's one line starts a line of its own
    return results


def _step(spec: NotebookSpec, specs: list[NotebookSpec], keys: dict[str, str], params: dict, run_dir: Path,
          selected: list[str], force: bool, log_output: bool) -> StepResult:
    """Run one notebook unless it is cached; record what it produced only once it succeeded."""
    record_path = run_dir / ".cache" / f"{spec.name}.json"
    record = read_json(record_path)
    reasons = ["--force"] if force else step_problems(run_dir, spec, keys[spec.name], record)
    if not reasons:
        return StepResult(spec.name, "cached", 0.0, spec.outputs)
    _check_upstream(spec, specs, keys, run_dir, selected)
    # Pending before the kernel starts: an interrupted or failed run is never taken for a finished one.
    pending = ledger.begin(run_dir, keys[spec.name], record)
    write_json(record_path, pending)
    t0 = time.time()
    execute(spec.path, params, run_dir / "notebooks" / spec.path.name, log_output, cwd=REPO_DIR)
    seconds = time.time() - t0
    missing = [o for o in spec.outputs if not (run_dir / o).exists()]
    if missing:
        raise NotebookFailed(f"notebook {spec.name} finished but did not write its declared outputs: "
                             f"{', '.join(missing)}")
    empty = [o for o in spec.outputs if (run_dir / o).is_file() and (run_dir / o).stat().st_size == 0]
    if empty:  # a figure or table saved from nothing is no result either
        raise NotebookFailed(f"notebook {spec.name} finished but wrote empty declared outputs: {', '.join(empty)}")
    others = [read_json(run_dir / ".cache" / f"{s.name}.json", {}) for s in specs if s.name != spec.name]
    done = ledger.finish(run_dir, pending, spec.outputs, others, seconds)
    _record_manifest(run_dir, spec, params, seconds, done["files"])
    write_json(record_path, done)  # last: from here on the step counts as done
    return StepResult(spec.name, "ran", seconds, spec.outputs, reasons[0])


def step_problems(run_dir: Path, spec: NotebookSpec, key: str, record: dict | None) -> list[str]:
    """Why `spec` is not cached in `run_dir`: [] when its last run finished with cache key `key`, every file it
    produced is still there unchanged, and the manifest describes its figures as they are."""
    if record and record.get("status") == ledger.DONE and record.get("key") != key:
        return ["its notebook, code, parameters or an upstream step changed"]
    reasons = ledger.problems(run_dir, record)
    if reasons:
        return reasons
    reasons = [f"{o} is missing" for o in spec.outputs if not (run_dir / o).exists()]
    manifest = read_json(run_dir / "figures" / "manifest.json", {})
    for o in spec.outputs:
        recorded = record["files"].get(o)
        if o.startswith("figures/") and recorded is not None:
            entry = manifest.get(o[len("figures/"):], {})
            if entry.get("sha256") != recorded["sha256"]:
                reasons.append(f"the manifest does not describe {o} as it is")
    return reasons


def _match(pattern: str, names: list[str]) -> str:
    hits = [n for n in names if n == pattern or n.split("_", 1)[-1] == pattern or n.startswith(pattern)]
    if len(hits) != 1:
        raise LofaError(f"--only {pattern!r} matches {hits or 'no notebook'}; notebooks: {', '.join(names)}")
    return hits[0]


def _check_upstream(spec, specs, keys, run_dir, selected) -> None:
    earlier = [s.name for s in specs[: [s.name for s in specs].index(spec.name)]]
    by_name = {s.name: s for s in specs}
    for dep in spec.depends if spec.depends is not None else earlier:
        if dep in selected or dep not in by_name:
            continue
        reasons = step_problems(run_dir, by_name[dep], keys[dep], read_json(run_dir / ".cache" / f"{dep}.json"))
        if reasons:
            raise LofaError(f"{spec.name} needs the results of {dep}, which are missing or stale at this scale "
                            f"({reasons[0]}); run `lofa reproduce` without --only, or add `--only {dep}`")


def _record_manifest(run_dir: Path, spec: NotebookSpec, params: dict, seconds: float, files: dict) -> None:
    """Manifest entries for the figures of `spec`, each with the sha256 its step record holds (`files`)."""
    path = run_dir / "figures" / "manifest.json"
    manifest = read_json(path, {})
    common = {"notebook": spec.name, "scale": params["scale"], "seeds": {k: v for k, v in params.items()
              if "seed" in k}, "git_commit": git_commit(), "device": device_description(params["device"]),
              "wall_time_s": round(seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "versions": package_versions()}
    for o in spec.outputs:
        if o.startswith("figures/"):
            manifest[o[len("figures/"):]] = {**common, "sha256": files[o]["sha256"] if o in files else None}
    write_json(path, manifest)
