"""The DiffLoRA-style baseline (lofa.baselines.diff_lora): its autoencoder reconstructs the zoo, its diffusion model
learns, its LoRA follows the condition, survives a save / load and loads into the base through diffusers.

Text-to-LoRA's toy zoo (tests/test_text_to_lora.py: LoRAs built from each case's attributes, a stub text encoder).
"""
import copy

import pytest
import torch
from safetensors.torch import load_file
from test_diffusers_loading import check_loaded, key_warnings  # noqa: F401  (key_warnings is a fixture)
from test_text_to_lora import world_data  # noqa: F401  (world_data is a fixture)

from lofa.baselines.diff_lora import DiffLora, DiffLoraConfig, lora_vectors, train_diff_lora
from lofa.config import preset
from lofa.errors import LofaError
from lofa.hypernet.data import delta_l1_per_case
from lofa.hypernet.predictor import predict_cases
from lofa.lora.formats import save_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(world_data):  # noqa: F811
    _, data = world_data
    cfg = preset(DiffLoraConfig, "smoke", {"steps": 1000, "hidden": 64, "depth": 2, "lr": 3e-3,
                                          "latent_dim": len(data.train_ids) - 1})
    return train_diff_lora(data, cfg, seed=0, progress=False)


def test_the_autoencoder_reconstructs_the_training_zoo_and_the_diffusion_loss_falls(world_data, trained):  # noqa: F811
    _, data = world_data
    model, losses = trained
    x = lora_vectors(data, data.train_ids)
    assert torch.allclose(model.decode(model.encode(x)), x, atol=1e-4 * x.abs().max())  # every direction kept
    assert len(losses) == 1000 and sum(losses[-40:]) / 40 < 0.8 * sum(losses[:40]) / 40


def test_the_lora_follows_the_condition(world_data, trained):  # noqa: F811
    """Each training case's sampled LoRA is closer to its own zoo LoRA than to another case's."""
    _, data = world_data
    ids = data.train_ids
    loras = predict_cases(trained[0], data.conditions("train"), ids)
    own = delta_l1_per_case(data, ids, [loras[c] for c in ids]).mean()
    other = delta_l1_per_case(data, ids, [loras[c] for c in ids[1:] + ids[:1]]).mean()
    assert own < 0.9 * other, (own, other)


def test_save_load_and_diffusers_loading(world_data, trained, tmp_path, key_warnings):  # noqa: F811
    gen, data = world_data
    model = trained[0]
    tokens, mask = data.conditions("eval").get(data.heldout_ids[:1])
    lora = model.predict(tokens, mask)
    assert {n: (f.B.shape[0], f.A.shape[1]) for n, f in lora.items()} == {t.name: t.shape for t in data.spec.targets}
    model.save_pretrained(tmp_path / "dl")
    again = DiffLora.from_pretrained(tmp_path / "dl").predict(tokens, mask)
    assert all(torch.equal(again[n].B, lora[n].B) and torch.equal(again[n].A, lora[n].A) for n in lora)
    save_lora(tmp_path / "dl.safetensors", lora)
    adapted = copy.deepcopy(gen.net)
    adapted.load_lora_adapter(load_file(tmp_path / "dl.safetensors"), prefix="transformer", adapter_name="x")
    check_loaded(gen.net, adapted, lora, key_warnings)


def test_too_wide_a_latent_or_condition_is_a_one_line_error(world_data, trained):  # noqa: F811
    _, data = world_data
    with pytest.raises(LofaError, match="needs more than"):
        train_diff_lora(data, preset(DiffLoraConfig, "smoke", {"latent_dim": len(data.train_ids)}), progress=False)
    with pytest.raises(LofaError, match="wide"):
        trained[0].predict(torch.zeros(3, data.cond_dim + 1))


def test_training_is_reproducible_whatever_the_global_rng_holds(world_data):  # noqa: F811
    _, data = world_data
    cfg = preset(DiffLoraConfig, "smoke", {"steps": 5})
    torch.manual_seed(1)
    a, _ = train_diff_lora(data, cfg, seed=3, progress=False)
    torch.manual_seed(2)
    b, _ = train_diff_lora(data, cfg, seed=3, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
