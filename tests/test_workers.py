"""No worker process outlives its parent: SIGKILL the process that started a `process_pool` (or the orchestrator
whose notebook kernel started it) and its workers and multiprocessing's resource tracker are gone in seconds."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from lofa import reproduce

TESTS = Path(__file__).resolve().parent


def busy(flag_dir: str) -> None:
    """A worker job: say which worker runs it, then work far longer than the test waits."""
    (Path(flag_dir) / str(os.getpid())).write_text("")
    time.sleep(120)


# Starts a two-worker pool on two busy jobs, waits until both run, then writes its descendants' pids.
PARENT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import psutil
    from lofa.workers import process_pool
    import test_workers

    flags = Path(sys.argv[1])
    pool = process_pool(2)
    jobs = [pool.submit(test_workers.busy, str(flags)) for _ in range(2)]
    while len(list(flags.glob("[0-9]*"))) < 2:
        time.sleep(0.05)
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    (flags / "descendants.json").write_text(json.dumps(pids))
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has exited; init reaps it
    except psutil.NoSuchProcess:
        return False


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "the parent exited"
        assert time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


def _assert_all_gone(pids: list[int], seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while any(_alive(p) for p in pids):
        alive = [" ".join(psutil.Process(p).cmdline())[:100] for p in pids if _alive(p)]
        assert time.time() < deadline, f"outlived their parent: {alive}"
        time.sleep(0.2)


def _kill_leftovers(path: Path) -> None:
    """After a failure: end what the test started and the code under test left behind."""
    for pid in json.loads(path.read_text()) if path.exists() else []:
        if _alive(pid):
            psutil.Process(pid).kill()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(reproduce.REPO_DIR), str(TESTS)]),
            "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def test_killing_the_parent_ends_its_workers_and_the_resource_tracker(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], env=_env(), stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(tmp_path / "descendants.json", proc)
        descendants = json.loads((tmp_path / "descendants.json").read_text())
        commands = [" ".join(psutil.Process(p).cmdline()) for p in descendants]
        assert len(descendants) == 3 and sum("resource_tracker" in c for c in commands) == 1, commands
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _assert_all_gone(descendants)
    finally:
        proc.kill()
        _kill_leftovers(tmp_path / "descendants.json")


# A notebook whose kernel starts the pool, as Run.build does; the orchestrator running it is then SIGKILLed.
NOTEBOOK_CELL = """
import json, os, sys, time
from pathlib import Path
import psutil
sys.path.insert(0, {tests!r})
from lofa.workers import process_pool
import test_workers

flags = Path(run_dir) / "flags"
flags.mkdir(parents=True, exist_ok=True)
pool = process_pool(2)
jobs = [pool.submit(test_workers.busy, str(flags)) for _ in range(2)]
while len(list(flags.glob("[0-9]*"))) < 2:
    time.sleep(0.05)
me = psutil.Process()
(flags / "descendants.json").write_text(json.dumps([me.pid] + [p.pid for p in me.children(recursive=True)]))
time.sleep(120)
"""

ORCHESTRATOR = textwrap.dedent("""
    import sys
    from lofa import reproduce
    reproduce.run("smoke", device="cpu", run_root=sys.argv[1], nb_dir=sys.argv[2], progress=False)
""")


def test_killing_the_orchestrator_ends_the_kernel_and_its_workers(tmp_path, make_notebook):
    make_notebook("01_pool", [NOTEBOOK_CELL.format(tests=str(TESTS))], outputs=["figures/never.png"])
    proc = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, str(tmp_path / "runs"), str(tmp_path / "nbs")],
                            env=_env(), stderr=subprocess.PIPE, text=True)
    flags = tmp_path / "runs" / "smoke" / "flags"
    try:
        _wait_for(flags / "descendants.json", proc)
        descendants = json.loads((flags / "descendants.json").read_text())
        assert len(descendants) == 4, descendants  # the kernel, two workers, the resource tracker
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _assert_all_gone(descendants)  # the kernel polls its parent each second, its workers twice a second
    finally:
        proc.kill()
        _kill_leftovers(flags / "descendants.json")
