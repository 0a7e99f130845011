import pytest

from lofa.errors import LofaError
from lofa.pipeline import Run


def test_build_refuses_unknown_steps_before_running_anything(tmp_path):
    run = Run("smoke", "cpu", 0, tmp_path)
    with pytest.raises(LofaError, match="unknown step 'hypernet'"):
        run.build([("base", "actions"), ("hypernet", "actions")])
    assert not (tmp_path / "base").exists()


def test_build_in_worker_processes_writes_the_artifacts_the_run_then_loads(tmp_path):
    run = Run("smoke", "cpu", 0, tmp_path)
    run.build([("condition_encoder", "styles"), ("condition_encoder", "identities")], workers=2)
    for task in ("styles", "identities"):
        assert (tmp_path / "encoders" / task / "encoder.safetensors").exists()
        run.condition_encoder(task)  # loads, trains nothing
