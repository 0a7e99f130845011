"""Every kind of LoRA file lofa writes loads through the diffusers entry point a user calls for its model family.

Wan family (lofa.models.video_dit, WanTransformer3DModel): diffusers, Wan and kohya naming through
`WanTransformer3DModel.load_lora_adapter(sd, prefix="transformer")` and `WanPipeline.lora_state_dict` +
`load_lora_into_transformer` (what `WanPipeline.load_lora_weights` runs). UNet family (lofa.models.image_unet,
UNet2DConditionModel, the SD / SDXL family): diffusers and kohya naming through
`UNet2DConditionModel.load_lora_adapter(sd, prefix="unet")` and the SD / SDXL pipelines' `lora_state_dict` +
`load_lora_into_unet` (what their `load_lora_weights` runs). Each load must wrap exactly the LoRA's modules, log
no missing / unexpected keys, and fuse to W + (alpha / r) · B A.
"""
import argparse
import copy
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor, load_lora, save_lora

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 2, 3.0  # alpha != rank: a loader that drops the scale fails the fused-weight check


@pytest.fixture(scope="module")
def wan():
    from lofa.models.video_dit import VideoDiTConfig, make_video_dit

    torch.manual_seed(0)
    return make_video_dit(VideoDiTConfig(num_layers=2, num_heads=2, head_dim=8, ffn_dim=32, text_dim=384)).eval()


@pytest.fixture(scope="module")
def unet():
    from lofa.config import preset
    from lofa.models.image_unet import ImageUNetConfig, make_image_unet

    torch.manual_seed(0)
    return make_image_unet(preset(ImageUNetConfig, "smoke")).eval()


def block_linears(net) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of every linear layer inside the denoiser's blocks (attention, projections, FFN)."""
    roots = ("blocks.", "down_blocks.", "mid_block.", "up_blocks.")
    return {n: tuple(m.weight.shape) for n, m in net.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(roots)}


def random_lora(shapes, seed=0) -> dict[str, LoraFactor]:
    g = torch.Generator().manual_seed(seed)
    return {n: LoraFactor(A=torch.randn(RANK, i, generator=g) * 0.2, B=torch.randn(o, RANK, generator=g) * 0.2,
                          alpha=ALPHA) for n, (o, i) in shapes.items()}


@pytest.fixture
def key_warnings():
    """Warnings diffusers and peft log while loading (missing / unexpected LoRA keys are reported this way)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def check_loaded(base, adapted, lora, warnings):
    """`adapted` (base + the loaded adapter "x") wraps exactly the LoRA's modules, logged no key problems, and its
    fused weights minus the base's are (alpha / r) · B A."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not [r.getMessage() for r in warnings if "key" in r.getMessage().lower()]
    wrapped = {n for n, m in adapted.named_modules() if isinstance(m, BaseTunerLayer)}
    assert wrapped == set(lora)
    adapted.fuse_lora(adapter_names=["x"])
    adapted.unload_lora()
    for name, factor in lora.items():
        fused = adapted.get_submodule(name).weight
        delta = fused - base.get_submodule(name).weight
        assert delta.abs().max() > 1e-3  # the module did change
        torch.testing.assert_close(delta, factor.delta_w, rtol=1e-4, atol=2e-6)


def keys_of(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("fmt", ["diffusers", "wan", "kohya"])
def test_wan_files_load_through_the_wan_pipeline(wan, tmp_path, key_warnings, fmt):
    from diffusers import WanPipeline

    lora = random_lora(block_linears(wan))
    path = tmp_path / f"{fmt}.safetensors"
    save_lora(path, lora, fmt=fmt)
    state_dict = WanPipeline.lora_state_dict(str(path))
    adapted = copy.deepcopy(wan)
    WanPipeline.load_lora_into_transformer(state_dict, transformer=adapted, adapter_name="x")
    check_loaded(wan, adapted, lora, key_warnings)


def test_wan_diffusers_file_loads_into_the_transformer(wan, tmp_path, key_warnings):
    lora = random_lora(block_linears(wan), seed=1)
    save_lora(tmp_path / "l.safetensors", lora)
    assert all(k.startswith("transformer.") for k in keys_of(tmp_path / "l.safetensors"))
    adapted = copy.deepcopy(wan)
    adapted.load_lora_adapter(load_file(tmp_path / "l.safetensors"), prefix="transformer", adapter_name="x")
    check_loaded(wan, adapted, lora, key_warnings)


def test_unet_diffusers_file_carries_the_unet_prefix_and_loads(unet, tmp_path, key_warnings):
    lora = random_lora(block_linears(unet), seed=2)
    save_lora(tmp_path / "l.safetensors", lora)
    keys = keys_of(tmp_path / "l.safetensors")
    assert keys and all(k.startswith("unet.down_blocks.") or k.startswith("unet.mid_block.")
                        or k.startswith("unet.up_blocks.") for k in keys)
    adapted = copy.deepcopy(unet)
    adapted.load_lora_adapter(load_file(tmp_path / "l.safetensors"), prefix="unet", adapter_name="x")
    check_loaded(unet, adapted, lora, key_warnings)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("pipeline", ["StableDiffusionPipeline", "StableDiffusionXLPipeline"])
def test_unet_files_load_through_the_sd_and_sdxl_pipelines(unet, tmp_path, key_warnings, fmt, pipeline):
    import diffusers

    loader = getattr(diffusers, pipeline)
    lora = random_lora(block_linears(unet), seed=3)
    path = tmp_path / f"{fmt}.safetensors"
    save_lora(path, lora, fmt=fmt)
    state_dict, network_alphas = loader.lora_state_dict(str(path))[:2]
    adapted = copy.deepcopy(unet)
    loader.load_lora_into_unet(state_dict, network_alphas, unet=adapted, adapter_name="x")
    check_loaded(unet, adapted, lora, key_warnings)


def test_unet_files_with_the_old_transformer_prefix_read_back_identically(unet, tmp_path):
    lora = random_lora(block_linears(unet), seed=4)
    save_lora(tmp_path / "old.safetensors", lora, prefix="transformer")  # what lofa wrote before
    save_lora(tmp_path / "new.safetensors", lora)
    assert keys_of(tmp_path / "old.safetensors")[0].startswith("transformer.")
    old, new = load_lora(tmp_path / "old.safetensors")[0], load_lora(tmp_path / "new.safetensors")[0]
    assert set(old) == set(new) == set(lora)
    for name in lora:
        assert torch.equal(old[name].A, new[name].A) and torch.equal(old[name].B, new[name].B)
        assert old[name].alpha == new[name].alpha


def test_wan_naming_is_refused_for_a_unet(unet, tmp_path):
    with pytest.raises(LofaError, match="fmt 'diffusers' or 'kohya'"):
        save_lora(tmp_path / "w.safetensors", random_lora(block_linears(unet)), fmt="wan")
    assert not list(tmp_path.iterdir())


def text_checkpoint(net, base_dir, checkpoint_dir, max_length=8):
    """A text-conditioned LoFA checkpoint with random weights over `net`, saved as a diffusers folder in base_dir
    that the checkpoint names by its relative path (as the pipeline's checkpoints do)."""
    import os

    from test_hypernet import random_stage2, tiny_cfg

    from lofa.hypernet import TargetSpec, save_pretrained

    net.save_pretrained(base_dir, safe_serialization=True)
    _, s2 = random_stage2(tiny_cfg(cond_dim=384), TargetSpec.from_module(net))
    save_pretrained(checkpoint_dir, s2, None, condition_encoder={"kind": "text", "max_length": max_length},
                    base=os.path.relpath(base_dir, checkpoint_dir))


def test_lofa_predict_for_a_unet_base_writes_a_file_the_unet_loads(unet, tmp_path, capsys, key_warnings):
    """`lofa predict` over a UNet base: the file carries `unet.` keys and loads with prefix="unet"."""
    from lofa.hypernet import LoFA
    from lofa.commands import predict as cli_predict

    text_checkpoint(unet, tmp_path / "base", tmp_path / "ckpt")
    out = tmp_path / "pred.safetensors"
    args = argparse.Namespace(checkpoint=str(tmp_path / "ckpt"), prompt="a face with round glasses", image=None,
                              pose=None, out=str(out), device="cpu")
    assert cli_predict(args) == 0
    assert all(k.startswith("unet.") for k in keys_of(out))
    model = LoFA.from_pretrained(tmp_path / "ckpt")
    lora = model.predict(*model.encode_condition(prompt="a face with round glasses"))
    adapted = copy.deepcopy(unet)
    adapted.load_lora_adapter(load_file(out), prefix="unet", adapter_name="x")
    check_loaded(unet, adapted, lora, key_warnings)
