"""LoRA file formats: round trips, diffusers loading with alpha, other namings, base weights, refusals."""
import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from lofa.errors import LofaError
from lofa.lora import formats
from lofa.lora.formats import (BaseWeightsFile, LoraFactor, check_compatible, detect_format, diffusers_to_wan,
                               load_base_weights, load_lora, save_lora, wan_to_diffusers)

TINY_WAN = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                text_dim=32, ffn_dim=64, patch_size=(1, 2, 2), freq_dim=32, rope_max_seq_len=32)
META = {"task": "actions", "case_id": 7, "prompts": ["a person waves"], "steps": 100, "seed": 3, "loss": 0.25}


@pytest.fixture(scope="module")
def model():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY_WAN).eval()


def block_linears(model, ffn=True):
    """{name: (out, in)} of every block's linear layers."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("blocks.") and (ffn or ".ffn." not in n)}


def random_lora(shapes, seed=0, rank=4, alpha=3.0, ffn_rank=2, ffn_alpha=5.0):
    """Rank / alpha differ between attention and FFN modules, so per-module patterns are exercised."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, (out, inp) in shapes.items():
        r, a = (ffn_rank, ffn_alpha) if ".ffn." in name else (rank, alpha)
        lora[name] = LoraFactor(A=torch.randn(r, inp, generator=g) * 0.3, B=torch.randn(out, r, generator=g) * 0.3,
                                alpha=a)
    return lora


def forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(1, 3, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), c, return_dict=False)[0]


def merged(model, lora):
    """The model with W + (alpha / r) B A written into its weights: what a loaded LoRA must compute."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, f in lora.items():
            modules[name].weight += f.delta_w
    return ref


@pytest.fixture
def diffusers_warnings():
    """Warnings diffusers logs while loading (missing / unexpected LoRA keys are reported this way)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def assert_same(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)
        assert a[name].alpha == b[name].alpha


def test_wan_name_mapping():
    pairs = {"blocks.3.self_attn.q": "blocks.3.attn1.to_q", "blocks.3.self_attn.o": "blocks.3.attn1.to_out.0",
             "blocks.12.cross_attn.v": "blocks.12.attn2.to_v", "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
             "blocks.0.ffn.2": "blocks.0.ffn.net.2", "head.head": "proj_out"}
    for wan, diffusers in pairs.items():
        assert wan_to_diffusers(wan) == diffusers and diffusers_to_wan(diffusers) == wan
    assert wan_to_diffusers("blocks.0.self_attn.norm_q") is None
    assert diffusers_to_wan("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") is None


@pytest.mark.parametrize("fmt", ["diffusers", "wan", "kohya"])
def test_round_trip_is_exact_in_every_naming(model, tmp_path, fmt):
    lora = random_lora(block_linears(model), alpha=4.0, ffn_alpha=2.0)  # alpha = rank: the paper's setting
    path = tmp_path / f"{fmt}.safetensors"
    save_lora(path, lora, META, fmt=fmt)
    assert detect_format(path) == fmt
    loaded, meta = load_lora(path)
    assert meta == META
    assert_same(loaded, lora)
    resolved, _ = load_lora(path, module_names=block_linears(model))
    assert_same(resolved, lora)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("fmt", ["wan", "kohya"])
def test_alpha_tensors_round_trip_exactly(model, tmp_path, fmt):
    lora = random_lora(block_linears(model), alpha=3.0, ffn_alpha=5.0)
    save_lora(tmp_path / "l.safetensors", lora, fmt=fmt)
    assert_same(load_lora(tmp_path / "l.safetensors")[0], lora)


def test_three_namings_give_identical_delta_w(model, tmp_path):
    # power-of-two scales (8 / 4, 1 / 2) are exact in float, so folding the scale into B (diffusers) is bitwise
    # the same ΔW; any other alpha agrees to float32 rounding.
    for alpha, ffn_alpha, exact in ((8.0, 1.0, True), (3.0, 5.0, False)):
        lora = random_lora(block_linears(model), seed=1, alpha=alpha, ffn_alpha=ffn_alpha)
        deltas = []
        for fmt in ("diffusers", "wan", "kohya"):
            save_lora(tmp_path / f"{fmt}.safetensors", lora, fmt=fmt)
            loaded, _ = load_lora(tmp_path / f"{fmt}.safetensors")
            deltas.append({n: f.delta_w for n, f in loaded.items()})
        for other in deltas[1:]:
            for n in lora:
                if exact:
                    assert torch.equal(deltas[0][n], other[n])
                torch.testing.assert_close(other[n], deltas[0][n], rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(other[n], lora[n].delta_w, rtol=1e-6, atol=1e-7)


def test_file_keys_and_metadata(model, tmp_path):
    lora = random_lora(block_linears(model))
    save_lora(tmp_path / "d.safetensors", lora, META)
    save_lora(tmp_path / "w.safetensors", lora, fmt="wan")
    save_lora(tmp_path / "k.safetensors", lora, fmt="kohya")
    from safetensors import safe_open

    with safe_open(tmp_path / "d.safetensors", "pt") as f:
        assert "transformer.blocks.0.attn1.to_out.0.lora_A.weight" in f.keys()
        config = json.loads(f.metadata()["lora_adapter_metadata"])
        assert json.loads(f.metadata()["lofa"]) == META
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 4  # scale folded into B
    assert config["transformer.rank_pattern"]["^blocks\\.1\\.ffn\\.net\\.2"] == 2
    assert set(config["transformer.target_modules"]) == set(lora)
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert {"diffusion_model.blocks.1.cross_attn.o.lora_B.weight", "diffusion_model.blocks.1.ffn.2.alpha"} \
            <= set(f.keys())
    with safe_open(tmp_path / "k.safetensors", "pt") as f:
        assert f.get_tensor("lora_unet_blocks_0_self_attn_q.alpha").item() == 3.0
        assert "lora_unet_blocks_1_ffn_0.lora_up.weight" in f.keys()


def test_diffusers_load_lora_adapter_applies_alpha(model, tmp_path, diffusers_warnings):
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora = random_lora(block_linears(model), seed=2)
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora, META)
    expected = forward(merged(model, lora))
    assert not torch.allclose(expected, forward(model), atol=1e-3)  # the LoRA changes the output

    adapted = copy.deepcopy(model)
    adapted.load_lora_adapter(str(path), adapter_name="case7")
    assert not [r for r in diffusers_warnings if "keys" in r.getMessage()]
    wrapped = {n for n, m in adapted.named_modules() if isinstance(m, BaseTunerLayer)}
    assert wrapped == set(lora)
    torch.testing.assert_close(forward(adapted), expected, atol=1e-5, rtol=1e-5)
    for name, m in adapted.named_modules():
        if name in lora:  # peft's own ΔW agrees with ours module by module
            torch.testing.assert_close(m.get_delta_weight("case7"), lora[name].delta_w, atol=1e-6, rtol=1e-5)


def test_pipeline_load_lora_weights(model, tmp_path, diffusers_warnings):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    lora = random_lora(block_linears(model, ffn=False), seed=3, rank=8, alpha=2.0)
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=copy.deepcopy(model),
                       scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(path), adapter_name="style")
    assert not [r for r in diffusers_warnings if "keys" in r.getMessage()]
    torch.testing.assert_close(forward(pipe.transformer), forward(merged(model, lora)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["wan", "kohya"])
def test_diffusers_converts_our_wan_and_kohya_files(model, tmp_path, fmt):
    """diffusers' own Wan / musubi converters read these files to the same ΔW (alpha folded into the factors)."""
    from diffusers import WanPipeline

    lora = random_lora(block_linears(model), seed=4)
    path = tmp_path / f"{fmt}.safetensors"
    save_lora(path, lora, fmt=fmt)
    state_dict = WanPipeline.lora_state_dict(str(path))
    adapted = copy.deepcopy(model)
    adapted.load_lora_adapter(state_dict, adapter_name="x")
    torch.testing.assert_close(forward(adapted), forward(merged(model, lora)), atol=1e-5, rtol=1e-5)


def test_reads_files_written_by_diffusers(model, tmp_path):
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    peft_model = copy.deepcopy(model)
    peft_model.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False,
                                      alpha_pattern={"^blocks\\.1\\.attn2\\.to_k": 6}))
    expected = {n: m.get_delta_weight("default") for n, m in peft_model.named_modules()
                if hasattr(m, "get_delta_weight") and "lora_A" in dir(m)}
    assert len(expected) == 8
    peft_model.save_lora_adapter(str(tmp_path / "adapter"))  # unprefixed keys and metadata
    WanPipeline.save_lora_weights(tmp_path / "pipe", transformer_lora_layers=get_peft_model_state_dict(peft_model),
                                  transformer_lora_adapter_metadata=peft_model.peft_config["default"].to_dict())
    for folder in ("adapter", "pipe"):
        loaded, meta = load_lora(tmp_path / folder)
        assert meta == {} and set(loaded) == set(expected)
        assert loaded["blocks.1.attn2.to_k"].alpha == 6 and loaded["blocks.0.attn1.to_q"].alpha == 2
        for name, delta in expected.items():
            torch.testing.assert_close(loaded[name].delta_w, delta, atol=1e-6, rtol=1e-5)


def test_other_namings_in_the_wild(tmp_path):
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)

    def write(name, tensors):
        save_file({k: v.clone() for k, v in tensors.items()}, tmp_path / name)
        return tmp_path / name

    # DiffSynth: peft in-model names, no prefix, no alpha -> alpha = rank
    p = write("diffsynth.safetensors", {"blocks.0.self_attn.q.lora_A.default.weight": A,
                                        "blocks.0.self_attn.q.lora_B.default.weight": B})
    (lora, _), fmt = load_lora(p), detect_format(p)
    assert fmt == "wan" and list(lora) == ["blocks.0.attn1.to_q"] and lora["blocks.0.attn1.to_q"].alpha == 2
    # original Wan with lora_down / lora_up and alpha, ComfyUI prefix
    p = write("wan_updown.safetensors", {"diffusion_model.blocks.1.cross_attn.o.lora_down.weight": A,
                                         "diffusion_model.blocks.1.cross_attn.o.lora_up.weight": B,
                                         "diffusion_model.blocks.1.cross_attn.o.alpha": torch.tensor(8.0)})
    lora, _ = load_lora(p)
    assert torch.equal(lora["blocks.1.attn2.to_out.0"].delta_w, 4.0 * B @ A)
    # peft save_pretrained folder: base_model.model. prefix, alpha in adapter_config.json (rsLoRA)
    (tmp_path / "peft").mkdir()
    save_file({"base_model.model.blocks.0.attn1.to_v.lora_A.weight": A,
               "base_model.model.blocks.0.attn1.to_v.lora_B.weight": B}, tmp_path / "peft/adapter_model.safetensors")
    (tmp_path / "peft/adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "use_rslora": True}))
    lora, _ = load_lora(tmp_path / "peft")
    torch.testing.assert_close(lora["blocks.0.attn1.to_v"].delta_w, 4 / 2 ** 0.5 * B @ A)
    # old diffusers attention-processor and LoRACompatibleLinear namings with network alphas
    unet = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    p = write("old.safetensors", {f"unet.{unet}.processor.to_out_lora.down.weight": A,
                                  f"unet.{unet}.processor.to_out_lora.up.weight": B,
                                  f"unet.{unet}.processor.to_out_lora.alpha": torch.tensor(1.0),
                                  f"unet.{unet}.to_k.lora.down.weight": A, f"unet.{unet}.to_k.lora.up.weight": B})
    lora, _ = load_lora(p)
    assert lora[f"{unet}.to_out.0"].alpha == 1.0 and lora[f"{unet}.to_k"].alpha == 2.0
    # bias deltas and text-encoder parts do not change the linear weights: skipped
    p = write("extras.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": A,
                                     "transformer.blocks.0.attn1.to_q.lora_B.weight": B,
                                     "transformer.blocks.0.attn1.to_q.lora_B.bias": torch.ones(4),
                                     "text_encoder.layer.0.q.lora_A.weight": A,
                                     "text_encoder.layer.0.q.lora_B.weight": B})
    assert list(load_lora(p)[0]) == ["blocks.0.attn1.to_q"]


def test_kohya_unet_names_resolve_against_the_base(tmp_path):
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    lora = {name: LoraFactor(A=torch.randn(2, 6), B=torch.randn(4, 2), alpha=1.0)}
    save_lora(tmp_path / "k.safetensors", lora, fmt="kohya")
    loaded, _ = load_lora(tmp_path / "k.safetensors", module_names=[name, "mid_block.attentions.0.proj_in"])
    assert_same(loaded, lora)
    with pytest.raises(LofaError, match="without the base model"):
        load_lora(tmp_path / "k.safetensors")
    with pytest.raises(LofaError, match="matches no module of the base"):
        load_lora(tmp_path / "k.safetensors", module_names=["mid_block.attentions.0.proj_in"])


@pytest.fixture(scope="module")
def base_folders(model, tmp_path_factory):
    """The same base weights as a diffusers folder, a sharded folder, a pipeline folder, and two single files."""
    root = tmp_path_factory.mktemp("base")
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    model.save_pretrained(root / "pipeline" / "transformer")
    (root / "pipeline" / "model_index.json").write_text("{}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "single.safetensors")
    wan = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        wan_key = f"{diffusers_to_wan(module)}.{leaf}" if diffusers_to_wan(module) else key
        wan[f"model.diffusion_model.{wan_key}"] = value
    save_file(wan, root / "wan_single.safetensors")
    return root


def test_base_weights_from_every_layout(model, base_folders, monkeypatch):
    names = list(block_linears(model))
    expected = {n: m.weight.detach() for n, m in model.named_modules() if n in names}
    assert len(list((base_folders / "sharded").glob("*.safetensors"))) > 1
    for layout in ("plain", "sharded", "pipeline", "single.safetensors", "wan_single.safetensors"):
        base = BaseWeightsFile(base_folders / layout)
        assert set(names) <= set(base) and base.shapes["blocks.0.ffn.net.0.proj"] == (64, 32)
        got = load_base_weights(base_folders / layout, names)
        assert list(got) == names and all(torch.equal(got[n], expected[n]) for n in names)

    reads = []
    real = formats._get_tensor
    monkeypatch.setattr(formats, "_get_tensor", lambda *a: reads.append(a[2]) or real(*a))
    load_base_weights(base_folders / "wan_single.safetensors", ["blocks.1.attn2.to_v"])
    assert reads == ["model.diffusion_model.blocks.1.cross_attn.v.weight"]  # only the requested tensor is read
    with pytest.raises(LofaError, match="no linear module 'blocks.9.attn1.to_q'"):
        load_base_weights(base_folders / "plain", ["blocks.9.attn1.to_q"])


def test_check_compatible_names_the_first_mismatch(model):
    shapes = block_linears(model)
    lora = random_lora(shapes)
    check_compatible(lora, shapes)
    check_compatible(lora, {n: torch.zeros(s) for n, s in shapes.items()})
    lora["blocks.7.attn1.to_q"] = lora["blocks.0.attn1.to_q"]
    lora["blocks.10.attn1.to_q"] = lora["blocks.0.attn1.to_q"]
    with pytest.raises(LofaError, match=r"'blocks\.7\.attn1\.to_q' is not in the base model"):
        check_compatible(lora, shapes)
    wrong = random_lora({"blocks.1.attn1.to_k": (32, 48), "blocks.0.ffn.net.2": (16, 64)})
    with pytest.raises(LofaError, match=r"'blocks\.0\.ffn\.net\.2' changes a \[16, 64\] weight .* is \[32, 64\]"):
        check_compatible(wrong, shapes)


def test_bad_files_are_refused_in_one_line(model, base_folders, tmp_path):
    good = random_lora(block_linears(model))
    save_lora(tmp_path / "good.safetensors", good)
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    (tmp_path / "model.bin").write_bytes(b"x")
    A, B = torch.randn(2, 32), torch.randn(32, 2)
    cases = {
        tmp_path / "missing.safetensors": "no such file",
        tmp_path / "truncated.safetensors": "truncated.safetensors",
        tmp_path / "garbage.safetensors": "not a readable safetensors file",
        tmp_path / "model.bin": "only .safetensors",
        base_folders / "single.safetensors": "no LoRA factors found",
    }
    tensors = {
        "unknown.safetensors": ({"blocks.0.attn1.to_q.lora_A.weight": A, "blocks.0.attn1.to_q.lora_B.weight": B,
                                 "blocks.0.attn1.to_q.hada_w1": A}, "unrecognised key 'blocks.0.attn1.to_q.hada_w1'"),
        "dora.safetensors": ({"blocks.0.attn1.to_q.lora_A.weight": A, "blocks.0.attn1.to_q.lora_B.weight": B,
                              "blocks.0.attn1.to_q.lora_magnitude_vector": B[:, 0]}, "DoRA"),
        "half.safetensors": ({"blocks.0.attn1.to_q.lora_A.weight": A}, "no up / lora_B factor"),
        "nan.safetensors": ({"blocks.0.attn1.to_q.lora_A.weight": A, "blocks.0.attn1.to_q.lora_B.weight":
                             torch.full((32, 2), float("nan"))}, "NaN or inf"),
        "conv.safetensors": ({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(2, 32, 1, 1),
                              "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(32, 2, 1, 1)}, "LoCon"),
        "wannorm.safetensors": ({"blocks.0.self_attn.norm_q.lora_A.weight": A,
                                 "blocks.0.self_attn.norm_q.lora_B.weight": B}, "no linear weight"),
        "diff.safetensors": ({"diffusion_model.blocks.0.self_attn.q.diff": torch.randn(32, 32)}, "full weight"),
    }
    for name, (content, message) in tensors.items():
        save_file({k: v.clone() for k, v in content.items()}, tmp_path / name)
        cases[tmp_path / name] = message
    for path, message in cases.items():
        with pytest.raises(LofaError) as err:
            load_lora(path)
        assert message in str(err.value) and "\n" not in str(err.value), (path, str(err.value))
    with pytest.raises(LofaError, match="unknown LoRA format"):
        save_lora(tmp_path / "x.safetensors", good, fmt="comfy")
    with pytest.raises(LofaError, match="no safetensors weights found"):
        BaseWeightsFile(tmp_path / "empty_dir_that_exists" if (tmp_path / "empty_dir_that_exists").mkdir() is None
                    else tmp_path)
