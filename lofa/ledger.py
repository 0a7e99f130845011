"""What a pipeline step produced, and whether all of it is still there and unchanged: the orchestrator's records.

A step's record (runs/<scale>/.cache/<notebook>.json) lists every file of the run folder the step claims, each
with its size, mtime and sha256. A step claims
  - the files it wrote: new or changed between the snapshot taken before its first attempt and the one taken after
    it finished (a run resumed after an interruption keeps the first attempt's snapshot, so what the interrupted
    attempt completed counts as written by the step);
  - its declared outputs;
  - what its previous record claimed and is still there (a rerun that only loads an artifact keeps owning it);
  - while it has no record of its own (a run folder from before these records, or artifacts made by hand), every
    artifact outside figures/ that no other step wrote: a file of unknown origin is claimed by every step that may
    have made it, which costs reruns but never reports a step `cached` whose artifacts are gone.
A step is intact when every file it claims exists with the recorded content: same size, and same mtime or else
same sha256 (a later step that rewrites a file with the same bytes, as the zoo rewrites its index, changes nothing).

Not artifacts: the executed notebooks (notebooks/), the figure manifest, and hidden files and folders (these
records, temp files of atomic writes in progress).
"""
from __future__ import annotations

import os
from pathlib import Path

from lofa.models.pretrained import sha256  # the shipped models' manifest hashes files the same way

EXCLUDED = ("notebooks", "figures/manifest.json")
RUNNING, DONE = "running", "done"


def snapshot(run_dir: Path) -> dict[str, list[int]]:
    """{relative posix path: [size, mtime_ns]} of every artifact file under `run_dir`."""
    run_dir = Path(run_dir)
    files = {}
    for folder, dirs, names in os.walk(run_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # records, temp folders of atomic writes
        for name in names:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            rel = path.relative_to(run_dir).as_posix()
            if rel in EXCLUDED or rel.split("/")[0] in EXCLUDED:
                continue
            stat = path.stat()
            files[rel] = [stat.st_size, stat.st_mtime_ns]
    return files


def begin(run_dir: Path, key: str, record: dict | None) -> dict:
    """The pending record of a step about to run, from its current record (None, an older format, done or
    pending): the snapshot before its first unfinished attempt, and what its last finished run claimed."""
    record = record or {}
    if record.get("status") == RUNNING:
        return {**record, "key": key}  # resuming: keep the first attempt's snapshot
    finished = record.get("status") == DONE
    return {"status": RUNNING, "key": key, "before": snapshot(run_dir), "history": finished,
            "previous": record.get("files", {}) if finished else {},
            "previous_found": record.get("found", []) if finished else []}


def finish(run_dir: Path, pending: dict, outputs: list[str], others: list[dict], seconds: float) -> dict:
    """The done record of a step that just succeeded (`pending` from `begin`; `others`: the other steps'
    records, whose written files are not claimed as found)."""
    run_dir = Path(run_dir)
    before, after = pending["before"], snapshot(run_dir)
    written = {rel for rel, stat in after.items() if before.get(rel) != stat}
    declared = {rel for rel in after if any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outputs)}
    carried = {rel for rel in pending["previous"] if rel in after}
    found = {rel for rel in pending["previous_found"] if rel in after}
    if not pending["history"]:
        written_by_others = set()
        for other in others:
            if other.get("status") == DONE:
                written_by_others |= set(other.get("files", {})) - set(other.get("found", []))
        found |= {rel for rel in after if not rel.startswith("figures/") and rel not in written_by_others}
    claimed = written | declared | carried | found
    known = _known_hashes([pending["previous"], *(o.get("files", {}) for o in others)])
    files = {}
    for rel in sorted(claimed):
        size, mtime_ns = after[rel]
        sha = known.get((rel, size, mtime_ns)) or sha256(run_dir / rel)
        files[rel] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha}
    return {"status": DONE, "key": pending["key"], "seconds": seconds, "files": files,
            "found": sorted(found - written)}


def problems(run_dir: Path, record: dict | None) -> list[str]:
    """Why the step of `record` is not complete: [] when it finished and every file it claims is unchanged."""
    if not record or record.get("status") != DONE:
        return ["it has not finished" if record and record.get("status") == RUNNING else "it has no record"]
    out = []
    for rel, want in record["files"].items():
        path = Path(run_dir) / rel
        if not path.is_file():
            out.append(f"{rel} is missing")
            continue
        stat = path.stat()
        if stat.st_size != want["size"]:
            out.append(f"{rel} changed")
        elif stat.st_mtime_ns != want["mtime_ns"] and sha256(path) != want["sha256"]:
            out.append(f"{rel} changed")
    return out


def _known_hashes(file_maps: list[dict]) -> dict[tuple, str]:
    """{(path, size, mtime_ns): sha256} from earlier records: a file they hashed and nobody touched since is not
    read again (the zoo and the hypernetwork checkpoints are most of a run's bytes)."""
    known = {}
    for files in file_maps:
        for rel, f in files.items():
            known[(rel, f["size"], f["mtime_ns"])] = f["sha256"]
    return known
