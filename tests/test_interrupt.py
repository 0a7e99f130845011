"""Ctrl-C during `lofa reproduce`: one line on stderr, exit 130, the kernel gone, and the interrupted step never
counted as done afterwards (not even when an earlier run of it had finished with the same cache key)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from lofa import reproduce

# The step writes its figure, then blocks while `block` exists: the test interrupts it there.
SLOW = """
import json, os, time
from pathlib import Path
run = Path(run_dir)
(run / "figures").mkdir(parents=True, exist_ok=True)
(run / "figures" / "slow.json").write_text(json.dumps({"seed": seed}))
(run / "kernel.pid").write_text(str(os.getpid()))
while (run / "block").exists():
    time.sleep(0.2)
"""

# The real CLI (`lofa.cli.main`, which turns KeyboardInterrupt into its line) on the test's notebooks; SIGINT gets
# Python's default handler, as in a terminal (a shell that started the test in the background may ignore it).
DRIVER = textwrap.dedent("""
    import signal, sys
    from pathlib import Path
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from lofa import cli, reproduce

    original = reproduce.discover

    def discover(nb_dir):
        return original(Path(sys.argv[1]))

    reproduce.discover = discover
    sys.exit(cli.main(["reproduce", "--scale", "smoke", "--device", "cpu", "--run-root", sys.argv[2], *sys.argv[3:]]))
""")


def _interrupt_cli(tmp_path, *extra):
    """Start the CLI, press Ctrl-C once the step's kernel runs, return (exit code, stderr, kernel pid)."""
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "block").write_text("")
    (run_dir / "kernel.pid").unlink(missing_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(reproduce.REPO_DIR)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "nbs"), str(tmp_path / "runs"), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run_dir / "kernel.pid").exists():
        assert proc.poll() is None and time.time() < deadline, "the notebook never started"
        time.sleep(0.1)
    kernel = int((run_dir / "kernel.pid").read_text())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err, kernel


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ctrl_c_prints_one_line_exits_130_and_stops_the_kernel(tmp_path, make_notebook):
    make_notebook("01_slow", [SLOW], outputs=["figures/slow.json"])
    code, err, kernel = _interrupt_cli(tmp_path)
    assert code == 130
    # the progress bar's redraws (text mode reads its carriage returns as line ends), then the one line: no
    # traceback from this process, papermill's asyncio tasks or the kernel
    lines = err.splitlines()
    assert lines[-1] == "lofa reproduce: interrupted; rerun the same command to resume"
    assert all(not ln or ln.startswith("lofa reproduce [smoke]") for ln in lines[:-1]), err
    deadline = time.time() + 10
    while not _gone(kernel):
        assert time.time() < deadline, "the kernel outlived the interrupted run"
        time.sleep(0.1)
    run_dir = tmp_path / "runs" / "smoke"
    assert not list((run_dir / "notebooks").glob("*.ipynb")), "a partial executed copy was left"
    assert json.loads((run_dir / ".cache" / "01_slow.json").read_text())["status"] == "running"


def test_an_interrupted_step_is_not_cached_even_after_an_earlier_finished_run(tmp_path, make_notebook):
    make_notebook("01_slow", [SLOW], outputs=["figures/slow.json"])
    kw = dict(device="cpu", run_root=tmp_path / "runs", nb_dir=tmp_path / "nbs", progress=False)
    assert [r.status for r in reproduce.run("smoke", **kw)] == ["ran"]  # no block file: finishes
    code, _, _ = _interrupt_cli(tmp_path, "--force")  # the same cache key, interrupted after rewriting its figure
    assert code == 130
    (tmp_path / "runs" / "smoke" / "block").unlink()
    res = reproduce.run("smoke", **kw)
    assert [r.status for r in res] == ["ran"] and res[0].reason == "it has not finished"
    assert [r.status for r in reproduce.run("smoke", **kw)] == ["cached"]
    assert (tmp_path / "runs" / "smoke" / "notebooks" / "01_slow.ipynb").exists()


# A stand-in kernel in a session of its own; the stubborn one ignores SIGTERM, as a kernel stuck in C code would.
KERNEL = "import signal, time\nprint('ready', flush=True)\ntime.sleep(60)"
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"


@pytest.mark.parametrize("script, presses, death", [(KERNEL, 1, -signal.SIGTERM), (STUBBORN, 2, -signal.SIGKILL)])
def test_ctrl_c_guard_stops_the_kernel_group_and_restores_the_handler(script, presses, death):
    """CtrlC itself: SIGTERM to the kernel's group on the first press, SIGKILL on the second, nothing raised in
    this process, and the previous SIGINT handler back afterwards."""
    from lofa.kernel import CtrlC

    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "ready\n"
    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as guard:
        guard.kernel_started(os.getpgid(child.pid))
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs between bytecodes of this thread
        code = child.wait(timeout=10)
    assert guard.presses == presses
    assert code == death
    assert signal.getsignal(signal.SIGINT) is before
