"""Worker processes that never outlive the process that started them.

A spawn worker of concurrent.futures learns of its parent's death only when it next talks to it: a parent killed
with SIGKILL (or dying in any way that runs no cleanup) leaves its workers training to the end of their jobs,
parented to init, and keeps multiprocessing's resource tracker alive with them (the tracker exits when the last
process holding its pipe does). Every worker of `process_pool` runs a thread that polls its parent's pid and ends
the worker as soon as the parent is gone.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

POLL_S = 0.5  # how often a worker looks for its parent: a dead parent's workers are gone within this


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor of `workers` spawn processes, each ending itself when this process dies."""
    context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads and state
    return ProcessPoolExecutor(workers, mp_context=context, initializer=watch_parent, initargs=(os.getpid(),))


def watch_parent(parent: int) -> None:
    """In a worker: start the daemon thread that ends this process once `parent` is no longer its parent."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="lofa-watch-parent", daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    # No cleanup worth running: whoever would collect this worker's result is gone, and every artifact write is
    # atomic, so the job's partial work leaves only temp files that the next run removes.
    os._exit(1)
