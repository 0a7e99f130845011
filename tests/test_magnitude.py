"""Norm matching (lofa.baselines.magnitude): a predicted LoRA rescaled, module by module, to the training LoRAs'
mean ΔW norm, keeping its direction."""
import pytest
import torch

from lofa.baselines import delta_norm, match_norms, module_norms
from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor


def _lora(seed: int, scale_b: float = 1.0, alpha: float = 2.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.attn.to_q": LoraFactor(torch.randn(4, 12, generator=g), scale_b * torch.randn(10, 4, generator=g),
                                             alpha),
            "blocks.0.ffn.net.2": LoraFactor(torch.randn(4, 20, generator=g), scale_b * torch.randn(12, 4, generator=g),
                                             alpha)}


def test_delta_norm_is_the_frobenius_norm_of_the_dense_delta_w():
    for factor in _lora(0, alpha=3.0).values():
        assert delta_norm(factor) == pytest.approx(float(factor.delta_w.norm()), rel=1e-5)
    zero = LoraFactor(torch.randn(2, 5), torch.zeros(3, 2), 2.0)
    assert delta_norm(zero) == 0.0


def test_module_norms_average_each_module_over_the_loras():
    loras = [_lora(1), _lora(2, scale_b=3.0), _lora(3, alpha=8.0)]
    norms = module_norms(loras)
    for name in loras[0]:
        expected = sum(float(lora[name].delta_w.norm()) for lora in loras) / 3
        assert norms[name] == pytest.approx(expected, rel=1e-5)


def test_match_norms_gives_each_module_its_target_norm_and_keeps_its_direction():
    small = _lora(4, scale_b=0.01)
    norms = module_norms([_lora(5), _lora(6)])
    matched = match_norms(small, norms)
    for name, factor in matched.items():
        assert float(factor.delta_w.norm()) == pytest.approx(norms[name], rel=1e-4)
        cosine = torch.nn.functional.cosine_similarity(factor.delta_w.flatten(), small[name].delta_w.flatten(), dim=0)
        assert float(cosine) == pytest.approx(1.0, abs=1e-5)
        assert factor.rank == small[name].rank and factor.alpha == small[name].alpha
        assert torch.equal(factor.A, small[name].A)
    # the input LoRA is left as it was
    assert float(small["blocks.0.attn.to_q"].delta_w.norm()) < 0.1 * norms["blocks.0.attn.to_q"]


def test_match_norms_keeps_a_zero_module_zero_and_refuses_a_module_without_a_norm():
    lora = _lora(7)
    lora["blocks.0.attn.to_q"] = LoraFactor(torch.randn(4, 12), torch.zeros(10, 4), 2.0)
    matched = match_norms(lora, module_norms([_lora(8)]))
    assert float(matched["blocks.0.attn.to_q"].delta_w.abs().max()) == 0.0
    with pytest.raises(LofaError, match="no target norm for module blocks.0.ffn.net.2"):
        match_norms(lora, {"blocks.0.attn.to_q": 1.0})


def test_module_norms_refuses_an_empty_list_and_loras_of_different_modules():
    with pytest.raises(LofaError, match="at least one LoRA"):
        module_norms([])
    other = {"blocks.1.attn.to_k": _lora(9)["blocks.0.attn.to_q"]}
    with pytest.raises(LofaError, match="different modules"):
        module_norms([_lora(9), other])
