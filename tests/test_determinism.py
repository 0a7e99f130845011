"""Artifacts that `Run.build` makes in worker processes must not depend on what a worker did before: its jobs come
in no fixed order, so anything drawn from the global random state would differ from run to run."""
import torch

from lofa.run import Run


def test_a_condition_encoder_does_not_depend_on_the_global_random_state(tmp_path):
    weights = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # what an earlier job of the same worker process may have left behind
        encoder = Run("smoke", "cpu", 0, tmp_path / str(i)).condition_encoder("styles", progress=False)
        weights.append(encoder.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
