"""`lofa response-map`: --json against float64 for every naming and base layout, table, plot, and refusals."""
import argparse
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lofa.commands import response_map as cli_response_map
from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor, diffusers_to_wan, save_lora

TINY_WAN = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                text_dim=32, ffn_dim=64, patch_size=(1, 2, 2), freq_dim=32, rope_max_seq_len=32)
TAU, EPS = 0.02, 1e-8


def run(*argv):
    """What the lead's `lofa` CLI does with cli_response_map: LofaError -> one line on stderr, exit code 2."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--lora", required=True)
    parser.add_argument("--tau", type=float, default=0.02)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", default=None)
    try:
        return cli_response_map(parser.parse_args([str(a) for a in argv]))
    except LofaError as err:
        print(f"lofa response-map: {err}", file=sys.stderr)
        return 2


def reference(w, f):
    A, B, W = (t.double().numpy() for t in (f.A, f.B, w))
    return np.abs(f.alpha / A.shape[0] * B @ A) / (np.abs(W) + EPS)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny Wan base (exact zeros in W, no entry within 0.1 % of τ) in five layouts, and one LoRA in three
    namings. Scales alpha / r are powers of two, so every naming stores bitwise the same ΔW."""
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_WAN).eval()
    g = torch.Generator().manual_seed(1)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    lora = {}
    with torch.no_grad():
        for name, m in modules.items():
            out, inp = m.weight.shape
            m.weight[torch.rand(out, inp, generator=g) < 0.1] = 0.0
            r, alpha = (2, 1.0) if ".ffn." in name else (4, 8.0)
            B = torch.randn(out, r, generator=g) * 0.05
            B[5] = 0.0
            lora[name] = LoraFactor(A=torch.randn(r, inp, generator=g) * 0.1, B=B, alpha=alpha)
            tie = torch.from_numpy(np.abs(reference(m.weight, lora[name]) / TAU - 1) < 1e-3)
            m.weight[tie] *= 1.5
    model.save_pretrained(root / "folder")
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "single.safetensors")
    wan = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        wan["diffusion_model." + (f"{diffusers_to_wan(module)}.{leaf}" if diffusers_to_wan(module) else key)] = value
    save_file(wan, root / "wan_single.safetensors")
    for fmt in ("diffusers", "wan", "kohya"):
        save_lora(root / f"{fmt}.safetensors", lora, {"case_id": 1}, fmt=fmt)
    weights = {n: m.weight.detach().clone() for n, m in modules.items()}
    return root, weights, lora


def run_json(capsys, *argv):
    assert run(*argv, "--json") == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("tau", [0.02, 0.1])
def test_json_equals_float64_reference(case, capsys, tau):
    root, weights, lora = case
    out = json.loads(run_json(capsys, "--base", root / "folder", "--lora", root / "kohya.safetensors",
                              "--tau", tau))
    assert out["tau"] == tau and list(out["modules"]) == sorted(lora, key=lambda n: (int(n.split(".")[1]), n))
    active = numel = 0
    for name, stats in out["modules"].items():
        m = reference(weights[name], lora[name])
        assert stats["shape"] == list(weights[name].shape)
        assert stats["active_fraction"] == (m > tau).sum() / m.size
        assert stats["mean_relative_change"] == pytest.approx(m.mean(), rel=1e-6)
        active, numel = active + (m > tau).sum(), numel + m.size
    assert out["active_fraction"] == pytest.approx(active / numel, rel=1e-12)
    assert 0.05 < out["active_fraction"] < 0.95


def test_namings_and_base_layouts_give_identical_numbers(case, capsys):
    root, _, _ = case
    outputs = {run_json(capsys, "--base", root / "folder", "--lora", root / f"{fmt}.safetensors")
               for fmt in ("diffusers", "wan", "kohya")}
    outputs |= {run_json(capsys, "--base", root / base, "--lora", root / "wan.safetensors")
                for base in ("sharded", "single.safetensors", "wan_single.safetensors")}
    assert len(outputs) == 1


def test_table_and_plot(case, capsys, tmp_path):
    root, _, _ = case
    plot = tmp_path / "out" / "map.png"
    assert run("--base", root / "sharded", "--lora", root / "diffusers.safetensors", "--plot", plot) == 0
    text = capsys.readouterr().out
    assert "diffusers naming, 20 modules, rank 2-4, alpha 2-4" in text  # alpha folded into B: alpha = r
    assert "% of entries active, by block" in text and "cross_o" in text and "ffn_out" in text
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_errors_exit_2_with_one_line_and_no_plot(case, capsys, tmp_path):
    root, weights, lora = case
    (tmp_path / "corrupt.safetensors").write_bytes((root / "wan.safetensors").read_bytes()[:300])
    big = {n: LoraFactor(A=torch.zeros(2, 48), B=torch.zeros(48, 2), alpha=2.0) for n in lora if "attn1" in n}
    save_lora(tmp_path / "other_model.safetensors", big)
    deeper = dict(lora, **{"blocks.2.attn1.to_q": lora["blocks.0.attn1.to_q"]})
    save_lora(tmp_path / "deeper.safetensors", deeper, fmt="wan")
    nan_base = {k: v.clone() for k, v in weights.items()}
    nan_base["blocks.1.attn2.to_k"][2, 2] = float("inf")
    save_file({f"{k}.weight": v for k, v in nan_base.items()}, tmp_path / "nan_base.safetensors")
    plot = tmp_path / "plots" / "map.png"
    cases = {
        ("--base", root / "folder", "--lora", tmp_path / "missing.safetensors"): "no such file",
        ("--base", tmp_path / "nowhere", "--lora", root / "wan.safetensors"): "no such file or folder",
        ("--base", root / "folder", "--lora", tmp_path / "corrupt.safetensors"): "not a readable safetensors",
        ("--base", root / "folder", "--lora", root / "single.safetensors"): "no LoRA factors found",
        ("--base", root / "folder", "--lora", tmp_path / "other_model.safetensors"):
            "'blocks.0.attn1.to_k' changes a [48, 48] weight but the base model's is [32, 32]",
        ("--base", root / "folder", "--lora", tmp_path / "deeper.safetensors"):
            "'blocks.2.attn1.to_q' is not in the base model",
        ("--base", tmp_path / "nan_base.safetensors", "--lora", root / "wan.safetensors"):
            "'blocks.1.attn2.to_k' contains NaN or inf",
        ("--base", root / "folder", "--lora", root / "wan.safetensors", "--tau", "nan"): "--tau nan",
    }
    for argv, message in cases.items():
        assert run(*argv, "--plot", plot) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
        assert not plot.parent.exists() or not list(plot.parent.iterdir())
    assert run("--base", root / "folder", "--lora", root / "wan.safetensors", "--plot", tmp_path / "x.nope") == 2
    assert "unsupported figure type 'nope'" in capsys.readouterr().err
