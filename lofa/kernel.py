"""Execute one notebook in a Jupyter kernel through papermill: an executed copy that appears only on success,
failures as one paragraph, and a Ctrl-C that stops the kernel instead of tearing through papermill.

Ctrl-C: jupyter_client starts the kernel in a session of its own, so the terminal's SIGINT reaches only this
process. Left alone it would raise KeyboardInterrupt wherever papermill's asyncio loop happens to be, which prints
pages of task tracebacks while the kernel writes into closed sockets. So while a notebook executes, SIGINT
terminates the kernel's process group instead (the kernel and the worker processes it started: every artifact write
is atomic, so nothing half-written survives), and `execute` raises KeyboardInterrupt from plain code once papermill
has returned; the CLI turns that into its one line. A second Ctrl-C kills the group outright.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from lofa.errors import LofaError


class NotebookFailed(LofaError):
    """A notebook raised or its kernel died; the message names the notebook, the cell and the error."""


def execute(notebook: Path, params: dict, out_path: Path, log_output: bool = False, cwd: Path | None = None) -> None:
    """Execute `notebook` with papermill in this process and write the executed copy to `out_path`.

    The copy is written under a hidden temporary name while the kernel runs (papermill saves it after every cell)
    and renamed onto `out_path` only when every cell succeeded; a failed run leaves `<name>.failed.ipynb` to read,
    an interrupted one nothing. Raises NotebookFailed (one paragraph) or KeyboardInterrupt (Ctrl-C).
    """
    import papermill
    from nbclient.exceptions import DeadKernelError

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.stem}.partial.ipynb")  # hidden: no artifact, no result
    failed_copy = out_path.with_name(f"{out_path.stem}.failed.ipynb")
    for stale in (out_path, failed_copy, partial):  # a copy from an earlier run would describe other results
        stale.unlink(missing_ok=True)
    ctrl_c = CtrlC()
    try:
        with ctrl_c:
            # The kernel's own log (ipykernel warns that its local TCP sockets are unencrypted on every start)
            # would land in the user's terminal; notebook errors travel through the kernel protocol and stay visible.
            papermill.execute_notebook(str(notebook), str(partial), parameters=params, kernel_name="python3",
                                       progress_bar=False, log_output=log_output, cwd=str(cwd or Path.cwd()),
                                       extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                       kernel_manager_class=WatchedKernelManager)
    except papermill.PapermillExecutionError as e:
        _raise_unless_interrupted(ctrl_c, partial)
        partial.replace(failed_copy)
        cell, first_line = _source_cell(notebook, e.cell_index)
        raise NotebookFailed(f"notebook {notebook.stem} failed in cell {cell} (`{first_line}`): {e.ename}: "
                             f"{e.evalue}  — executed copy: {failed_copy}") from None
    except DeadKernelError as e:
        _raise_unless_interrupted(ctrl_c, partial)
        if partial.exists():
            partial.replace(failed_copy)
        raise NotebookFailed(f"notebook {notebook.stem}: the kernel died ({e}); most often out of memory — try a "
                             f"smaller scale or free memory. Executed copy: {failed_copy}") from None
    except Exception:
        _raise_unless_interrupted(ctrl_c, partial)  # a kernel stopped while starting fails in other ways
        raise
    _raise_unless_interrupted(ctrl_c, partial)  # Ctrl-C during the last cell: the run was still not asked for
    partial.replace(out_path)


def _raise_unless_interrupted(ctrl_c: "CtrlC", partial: Path) -> None:
    """After Ctrl-C, whatever papermill reported: drop the partial copy and raise KeyboardInterrupt."""
    if ctrl_c.presses:
        partial.unlink(missing_ok=True)
        raise KeyboardInterrupt


def _source_cell(notebook: Path, index: int) -> tuple[int, str]:
    """1-based number and first line of the failing cell in the source notebook, from papermill's index into the
    parameterised notebook (which has one injected cell right after the `parameters` cell)."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if tagged and index > tagged[0] + 1:
        index -= 1
    lines = [ln for ln in "".join(cells[index]["source"]).splitlines() if ln.strip()] if index < len(cells) else []
    return index + 1, (lines[0][:80] if lines else "")


# The guard of the notebook executing now, for the kernel manager (which nbclient builds) to report its kernel to.
_ACTIVE: "CtrlC | None" = None


class CtrlC:
    """While active, SIGINT stops the kernel's process group (SIGTERM, then SIGKILL on a second press) and is
    counted in `presses`; it raises nothing. Outside the main thread (where no signal handler can be set) it does
    nothing."""

    def __init__(self):
        self.presses = 0
        self.kernel_group: int | None = None
        self._previous = None

    def __enter__(self) -> "CtrlC":
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            signal.signal(signal.SIGINT, self._previous)
            _ACTIVE = None

    def kernel_started(self, group: int) -> None:
        self.kernel_group = group
        if self.presses:  # Ctrl-C came while the kernel was starting
            self._stop_kernel()

    def _on_sigint(self, signum, frame) -> None:
        self.presses += 1
        self._stop_kernel()

    def _stop_kernel(self) -> None:
        if self.kernel_group is None:
            return  # not started yet: kernel_started stops it
        try:
            os.killpg(self.kernel_group, signal.SIGTERM if self.presses == 1 else signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


class WatchedKernelManager(AsyncKernelManager):
    """jupyter_client's kernel manager, reporting the started kernel's process group to the active CtrlC."""

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw) -> None:
        # jupyter_client's documented place to change how the kernel process starts
        await super()._async_launch_kernel(kernel_cmd, **kw)
        if _ACTIVE is not None:
            _ACTIVE.kernel_started(self.provisioner.pgid)
