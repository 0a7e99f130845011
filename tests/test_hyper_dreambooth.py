"""The HyperDreamBooth-style baseline (lofa.baselines.hyper_dreambooth): its rank-1 hypernetwork learns the zoo,
rank relaxation keeps the prediction's ΔW, and the fine-tuned LoRA moves and loads into the base through diffusers.

Text-to-LoRA's toy zoo (tests/test_text_to_lora.py: LoRAs built from each case's attributes, a stub text encoder).
"""
import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from test_diffusers_loading import check_loaded, key_warnings  # noqa: F401  (key_warnings is a fixture)
from test_hypernet_data import StubText
from test_text_to_lora import TRAIN, world_data  # noqa: F401  (world_data is a fixture)

from lofa.baselines import TextToLoraConfig, train_text_to_lora
from lofa.baselines.hyper_dreambooth import HyperDreamBoothConfig, relax_rank
from lofa.baselines.initialisation import finetune_from, method_name
from lofa.config import preset
from lofa.errors import LofaError
from lofa.hypernet.predictor import predict_cases
from lofa.lora.formats import save_lora
from lofa.lora.train import LoraTrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def compressed(world_data, tmp_path_factory):  # noqa: F811
    """The rank-1 hypernetwork trained on the toy zoo, and its history."""
    _, data = world_data
    cfg = dataclasses.replace(preset(TextToLoraConfig, "smoke", {"dropout": 0.0}),
                              rank=HyperDreamBoothConfig().rank, start="zero")
    return train_text_to_lora(data, cfg, TRAIN, tmp_path_factory.mktemp("hdb"), progress=False)


def recipe(data, steps=2):
    return LoraTrainConfig(rank=data.rank, alpha=float(data.alpha_value), steps=steps, batch_size=2, n_renders=4,
                           include_ffn=True)


def test_the_rank_one_network_learns_the_zoo(world_data, compressed):  # noqa: F811
    _, data = world_data
    model, history = compressed
    loss = [h["loss"] for h in history]
    assert sum(loss[-10:]) / 10 < 0.8 * sum(loss[:10]) / 10
    lora = predict_cases(model, data.conditions("eval"), data.heldout_ids[:1])[data.heldout_ids[0]]
    assert {f.rank for f in lora.values()} == {1}


def test_rank_relaxation_keeps_the_predicted_delta_and_adds_fresh_directions(world_data, compressed):  # noqa: F811
    _, data = world_data
    case = data.heldout_ids[0]
    lora = predict_cases(compressed[0], data.conditions("eval"), [case])[case]
    relaxed = relax_rank(lora, recipe(data), seed=0)
    for name, factor in lora.items():
        r = relaxed[name]
        assert r.rank == data.rank and r.alpha == float(data.alpha_value)
        assert torch.allclose(r.delta_w, factor.delta_w, atol=1e-6)
        assert not r.B[:, 1:].any() and r.A[1:].abs().sum() > 0  # new directions: B = 0, A drawn as peft does
    with pytest.raises(LofaError, match=r"a rank-2 prediction cannot be relaxed to the recipe.s lower rank 1"):
        relax_rank(relaxed, dataclasses.replace(recipe(data), rank=1), seed=0)


def test_the_fine_tuned_lora_moves_and_loads_into_the_base_through_diffusers(world_data, compressed, tmp_path,
                                                                             key_warnings):  # noqa: F811
    gen, data = world_data
    gen = copy.deepcopy(gen)
    torch.nn.init.normal_(gen.net.proj_out.weight, std=0.05)  # the untrained zero output would pass no gradient back
    case = data.train_ids[0]
    lora = predict_cases(compressed[0], data.conditions("eval"), [case])[case]
    relaxed = relax_rank(lora, recipe(data), seed=0)
    tuned = finetune_from(gen, data.world, [case], {"HDB": {case: relaxed}}, recipe(data), [2], seed=3,
                          text=StubText(), progress=False)[method_name("HDB", 2)][case]
    assert any(not torch.allclose(tuned[n].delta_w, relaxed[n].delta_w) for n in relaxed)
    save_lora(tmp_path / "hdb.safetensors", tuned)
    adapted = copy.deepcopy(gen.net)
    adapted.load_lora_adapter(load_file(tmp_path / "hdb.safetensors"), prefix="transformer", adapter_name="x")
    check_loaded(gen.net, adapted, tuned, key_warnings)
