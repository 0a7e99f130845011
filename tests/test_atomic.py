"""Atomic writes, tested by failing them midway: the serializer writes part of the new file and then raises (or
the process dies), and the old file must still be there, whole, with no temp file beside it after a raise; a full
disk is reported as one line (LofaError)."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

from lofa import io
from lofa.errors import LofaError

OLD = b'{"old": true}\n'


def _half_then_raise(path, data: bytes):
    """What a serializer does when the disk fills up: part of the bytes land in `path` (a path or an open binary
    file), then an error."""
    if hasattr(path, "write"):
        path.write(data[: len(data) // 2])
    else:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def _failing_write_text(self, text, *args, **kwargs):
    _half_then_raise(self, text.encode())


def _failing_save_file(tensors, filename, metadata=None):
    _half_then_raise(filename, b"\x00" * 4096)


def _failing_torch_save(obj, f, *args, **kwargs):
    _half_then_raise(f, b"\x00" * 4096)


def _write_text(path):
    io.write_text(path, "new text, longer than the old one\n")


def _write_json(path):
    io.write_json(path, {"new": list(range(100))})


def _save_safetensors(path):
    io.save_safetensors({"w": torch.ones(64, 64)}, path)


def _save_torch(path):
    io.save_torch({"step": 3}, path)


CASES = {"write_text": (_write_text, pathlib.Path, "write_text", _failing_write_text),
         "write_json": (_write_json, pathlib.Path, "write_text", _failing_write_text),
         "save_safetensors": (_save_safetensors, safetensors.torch, "save_file", _failing_save_file),
         "save_torch": (_save_torch, torch, "save", _failing_torch_save)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_write_failing_midway_leaves_the_old_file_whole(tmp_path, monkeypatch, case):
    write, owner, name, failing = CASES[case]
    path = tmp_path / "artifact"
    path.write_bytes(OLD)
    monkeypatch.setattr(owner, name, failing)
    with pytest.raises(LofaError, match=f"^cannot write {path}: no space left on device; free space and rerun$"):
        write(path)
    assert path.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # the half-written temp file is gone


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_writes_succeed_and_replace_the_old_file(tmp_path, case):
    """The check above is not passed by a writer that writes nothing: unpatched, each one replaces the file."""
    write = CASES[case][0]
    path = tmp_path / "artifact"
    path.write_bytes(OLD)
    write(path)
    assert path.read_bytes() != OLD and path.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


# A process killed in the middle of write_json (os._exit: no except or finally runs, as under SIGKILL).
KILLED = textwrap.dedent("""
    import os, pathlib, sys
    from lofa import io

    def dying_write_text(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
            f.flush()
        os._exit(9)

    pathlib.Path.write_text = dying_write_text
    io.write_json(sys.argv[1], {"new": list(range(100))})
""")


def test_a_process_killed_midway_leaves_the_old_file_readable(tmp_path):
    path = tmp_path / "index.json"
    path.write_bytes(OLD)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(io.__file__).parents[1])}
    assert subprocess.run([sys.executable, "-c", KILLED, str(path)], env=env).returncode == 9
    assert io.read_json(path) == json.loads(OLD)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "index.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".index.json.") and leftovers[0].endswith(".tmp")
