"""The hypernetwork's model, tokenizer, losses, predictor and benchmark, at tiny CPU sizes."""
import argparse
import json

import pytest
import torch

from lofa.analysis import response_map
from lofa.errors import LofaError
from lofa.hypernet import BaseWeights, HyperConfig, LoFA, Stage1, Stage2, TargetSpec, merge_lora_, save_pretrained
from lofa.hypernet.losses import balanced_bce, delta_l1, factor_l1, map_metrics, stage2_loss
from lofa.hypernet.model import trim_condition

TINY = dict(d_model=32, n_heads=2, depth=2, patch=8, rank=4, alpha=8.0, cond_dim=12, cond_len=10, map_rank=4)

# UNet-like names: attention at two widths, cross-attention k/v from a 12-wide text, one non-square FFN.
MIXED_SHAPES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (16, 16),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (16, 12),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": (16, 40),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (24, 24),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (24, 12),
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (24, 24),
}


def tiny_cfg(**kw):
    return HyperConfig(**{**TINY, **kw})


def mixed_base(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    spec = TargetSpec.from_shapes(MIXED_SHAPES)
    weights = {n: torch.randn(s, generator=g) * 0.05 * scale for n, s in MIXED_SHAPES.items()}
    return spec, weights, BaseWeights(spec, weights)


def condition(n=2, k=6, valid=(4, 6), seed=1, dim=12):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, k, dim, generator=g)
    mask = torch.zeros(n, k, dtype=torch.bool)
    for i, v in enumerate(valid):
        mask[i, :v] = True
    return cond, mask


def random_stage2(cfg, spec, seed=0):
    torch.manual_seed(seed)
    s1 = Stage1(cfg, spec)
    s2 = Stage2.from_stage1(s1)
    with torch.no_grad():  # B and the feature cross-attention outputs start at zero; make the outputs non-trivial
        for p in s2.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return s1.eval(), s2.eval()


def tiny_checkpoint(root, kind, input_shape=None, stage1=False, name="lofa"):
    """A tiny LoFA checkpoint root/name conditioned on `kind` ("text", "image" or "pose", whose encoder takes
    `input_shape`), over the mixed UNet-like base saved as root/base.safetensors -> the checkpoint folder."""
    from safetensors.torch import save_file

    from lofa.models.cond_encoders import CondEncoderConfig, make_condition_encoder

    spec, weights, _ = mixed_base()
    save_file({f"{n}.weight": w.contiguous() for n, w in weights.items()}, root / "base.safetensors")
    if kind == "text":
        encoder, cond_dim = {"kind": "text", "max_length": 8}, 384
    else:
        grid = {"grid": (2, 2, 2)} if kind == "pose" else {}
        encoder = make_condition_encoder(CondEncoderConfig(kind=kind, channels=(4, 8), dim=12, proj_dim=4,
                                                           input_shape=input_shape, **grid))
        cond_dim = 12
    s1, s2 = random_stage2(tiny_cfg(cond_dim=cond_dim), spec)
    save_pretrained(root / name, s2, s1 if stage1 else None, condition_encoder=encoder, base="../base.safetensors")
    return root / name


# --- target spec and tokenizer -----------------------------------------------------------------------------------

def test_target_spec_parses_depth_and_type_for_unet_names():
    spec = TargetSpec.from_shapes(MIXED_SHAPES)
    assert spec.block_names == ["down_blocks.0.attentions.0.transformer_blocks.0",
                                "down_blocks.1.attentions.0.transformer_blocks.0",
                                "mid_block.attentions.0.transformer_blocks.0"]
    assert spec.type_names == ["attn1.to_q", "attn2.to_k", "ff.net.2"]
    assert [t.depth for t in spec.targets] == [0, 0, 0, 1, 1, 2]
    assert [t.type for t in spec.targets] == [0, 1, 2, 0, 1, 0]
    assert TargetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(LofaError, match="block pattern"):
        TargetSpec.from_shapes({"proj_out": (4, 4)})


def test_target_spec_from_wan_module():
    from lofa.models.video_dit import VideoDiTConfig, make_video_dit

    net = make_video_dit(VideoDiTConfig(num_layers=2, num_heads=2, head_dim=8, ffn_dim=32, text_dim=12))
    spec = TargetSpec.from_module(net)
    assert len(spec) == 16 and len(spec.block_names) == 2
    assert spec.type_names == ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    ffn = TargetSpec.from_module(net, include=[r"ffn\.net\.(0\.proj|2)$"])
    assert {t.shape for t in ffn.targets} == {(32, 16), (16, 32)}


def test_tokenizer_patches_masks_and_rms_invariance():
    spec, weights, base = mixed_base()
    cfg = tiny_cfg()
    s1 = Stage1(cfg, spec)
    tok = s1.backbone.tokenizer
    # 40 columns / patch 8 -> 5 patch columns, 24 rows -> 3; the target with most patches (2 x 5) sets S.
    assert (tok.grid_rows, tok.grid_cols) == (3, 5) and tok.seq_len == 1 + 10
    targets = torch.arange(len(spec))
    mask = tok.token_mask(targets)
    n_patches = [-(-o // 8) * -(-i // 8) for o, i in MIXED_SHAPES.values()]
    assert n_patches == [4, 4, 10, 9, 6, 9] and mask.shape == (6, 11)
    assert mask.sum(1).tolist() == [1 + n for n in n_patches]
    # Patches are the RMS-normalised, zero-padded matrix, row-major over the patch grid.
    w = weights[spec.names[2]]  # 16 x 40
    p = tok.patches(w[None], base.rms[2:3])[0]
    rebuilt = p.view(2, 5, 8, 8).transpose(1, 2).reshape(16, 40)
    torch.testing.assert_close(rebuilt, w / w.square().mean().sqrt())
    # Tokens are zero at padded positions and invariant to the scale of W.
    x = tok(base, targets)
    assert (x[~mask] == 0).all()
    _, _, base10 = mixed_base(scale=10.0)
    torch.testing.assert_close(tok(base10, targets), x, rtol=1e-5, atol=1e-6)


def broadcast_sum(v):
    return v.sum(1, keepdim=True).expand_as(v)


def test_token_layout_packs_real_tokens_by_count_and_unpacks_with_zero_pads():
    spec, _, base = mixed_base()
    tok = Stage1(tiny_cfg(), spec).backbone.tokenizer
    targets = torch.arange(len(spec))
    layout = tok.layout(targets)
    counts = tok.mask[targets].sum(1)
    assert layout.is_padded and layout.index.numel() == int(counts.sum())
    assert sum(g * s for _, g, s in layout.spans) == int(counts.sum())
    assert sorted(s for _, _, s in layout.spans) == sorted(set(counts.tolist()))
    x = torch.randn(2, len(spec), tok.seq_len, 3) * tok.mask[targets, :, None]   # zero at pads, as the tokenizer
    torch.testing.assert_close(layout.unpack(layout.pack(x)), x, rtol=0, atol=0)
    # per_matrix hands fn each matrix's own tokens: a per-matrix sum equals the padded sum over real tokens
    sums = layout.unpack(layout.per_matrix(broadcast_sum, layout.pack(x)))
    torch.testing.assert_close(sums[:, :, 0], x.sum(2))
    one = tok.layout(torch.tensor([0]))
    assert one.spans == ((0, 1, int(counts[0])),)


def test_base_weights_checks_names_and_shapes():
    spec, weights, _ = mixed_base()
    with pytest.raises(LofaError, match="lack"):
        BaseWeights(spec, {k: v for k, v in list(weights.items())[1:]})
    bad = dict(weights)
    bad[spec.names[0]] = torch.zeros(3, 3)
    with pytest.raises(LofaError, match="shape"):
        BaseWeights(spec, bad)


# --- the condition ------------------------------------------------------------------------------------------------

def test_condition_kv_computed_once_per_condition_and_block():
    spec, _, base = mixed_base()
    s1 = Stage1(tiny_cfg(), spec)
    cond, mask = condition()
    calls = []
    for blk in s1.backbone.blocks:
        blk.cross.kv.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    s1(base, torch.arange(len(spec)), cond, mask)
    # One call per block, on [N, K', d]: the K / V of the condition are shared by all 6 matrices' tokens.
    assert calls == [(2, 6, 32)] * 2


def test_trimming_and_masks_are_exact_and_samples_independent():
    spec, _, base = mixed_base()
    s1 = Stage1(tiny_cfg(), spec).eval()
    targets = torch.arange(len(spec))
    cond, mask = condition(n=2, k=6, valid=(3, 5))
    both = s1(base, targets, cond, mask)
    for i, v in enumerate((3, 5)):
        alone = s1(base, targets, cond[i:i + 1, :v])  # no padding, no mask at all
        torch.testing.assert_close(both.features[i], alone.features[0], rtol=1e-4, atol=1e-5)
        for j in range(len(spec)):
            torch.testing.assert_close(both.logits[j][i], alone.logits[j][0], rtol=1e-4, atol=1e-4)
    c, m = trim_condition(cond, mask)
    assert c.shape[1] == 5 and m is not None
    c, m = trim_condition(cond[:1], mask[:1])
    assert c.shape[1] == 3 and m is None
    with pytest.raises(LofaError, match="no valid token"):
        trim_condition(cond, torch.zeros(2, 6, dtype=torch.bool))


# --- Stage I ------------------------------------------------------------------------------------------------------

def test_stage1_logits_can_fit_no_response():
    """The authors' softplus head kept p >= 0.45; an unconstrained head must reach p ~ 0 where nothing responds."""
    spec, _, base = mixed_base()
    torch.manual_seed(0)
    s1 = Stage1(tiny_cfg(), spec)
    cond, mask = condition()
    targets = torch.tensor([0, 3])
    opt = torch.optim.Adam(s1.parameters(), lr=3e-2)
    for _ in range(15):
        logits = torch.cat([x.flatten() for x in s1(base, targets, cond, mask).logits])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
    logits = s1(base, targets, cond, mask).logits
    assert [tuple(x.shape[1:]) for x in logits] == [spec.targets[t].shape for t in targets.tolist()]
    assert max(float(torch.sigmoid(x).max().detach()) for x in logits) < 0.1


def test_stage1_logits_of_a_target_do_not_depend_on_its_batch_mates():
    """Logits are computed per group of equal shapes: a target's map must be the one it gets alone."""
    spec, _, base = mixed_base()
    torch.manual_seed(0)
    s1 = Stage1(tiny_cfg(), spec).eval()
    cond, mask = condition()
    every = s1(base, torch.arange(len(spec)), cond, mask).logits
    for t in range(len(spec)):
        alone = s1(base, torch.tensor([t]), cond, mask).logits[0]
        assert alone.shape == (2, *spec.targets[t].shape)
        torch.testing.assert_close(every[t], alone, rtol=1e-4, atol=1e-4)


def test_response_map_broadcasts_over_a_batch_and_metrics():
    w = torch.tensor([[1.0, 0.01], [0.5, -2.0]])
    dw = torch.tensor([[0.03, 0.001], [0.001, 0.05]])
    assert response_map(dw, w, tau=0.02).tolist() == [[True, True], [False, True]]
    batch = response_map(torch.stack([dw, torch.zeros_like(dw)]), w, tau=0.02)  # w [out, in] over ΔW [N, out, in]
    assert batch.shape == (2, 2, 2) and batch[0].tolist() == [[True, True], [False, True]] and not batch[1].any()
    pred = torch.tensor([True, True, False, False])
    true = torch.tensor([True, False, True, False])
    m = map_metrics(pred, true)
    assert m == pytest.approx({"density": 0.5, "pred_density": 0.5, "precision": 0.5, "recall": 0.5,
                               "iou": 1 / 3, "cosine": 0.5})


def test_balanced_bce_weighs_classes_equally():
    logits = torch.tensor([2.0, -1.0, -1.0, -1.0])
    target = torch.tensor([True, False, False, False])
    valid = torch.ones(4, dtype=torch.bool)
    f = torch.nn.functional.binary_cross_entropy_with_logits
    pos = f(torch.tensor(2.0), torch.tensor(1.0))
    neg = f(torch.tensor(-1.0), torch.tensor(0.0))
    torch.testing.assert_close(balanced_bce(logits, target, valid), (pos + neg) / 2)
    torch.testing.assert_close(balanced_bce(logits, target, valid, "none"), (pos + 3 * neg) / 4)
    # invalid entries are ignored
    torch.testing.assert_close(balanced_bce(torch.cat([logits, torch.tensor([50.0])]),
                                            torch.cat([target, torch.tensor([False])]),
                                            torch.cat([valid, torch.tensor([False])])), (pos + neg) / 2)


# --- Stage II -----------------------------------------------------------------------------------------------------

def test_stage2_from_stage1_starts_as_stage1():
    spec, _, base = mixed_base()
    torch.manual_seed(0)
    s1 = Stage1(tiny_cfg(), spec).eval()
    s2 = Stage2.from_stage1(s1).eval()
    for k, v in s1.backbone.state_dict().items():
        assert torch.equal(v, s2.backbone.state_dict()[k])
    assert set(s2.backbone.feature_cross) == {"0", "1"}  # depth 2: after the middle and the last block
    cond, mask = condition()
    targets = torch.arange(len(spec))
    f1 = s1(base, targets, cond, mask, decode_map=False).features
    f2 = s2.backbone(s2.backbone.prefix(base, targets), s2.backbone.tokenizer.layout(targets), cond, mask[:, :6], f1)
    torch.testing.assert_close(f2, f1)  # the zero-initialised feature cross-attention is the identity
    out = s2(base, targets, cond, mask, f1)
    assert not out.B.any()  # B = 0: ΔW = 0 at initialisation, as a LoRA


def test_stage2_single_stage_runs_without_prior():
    spec, _, base = mixed_base()
    cond, mask = condition()
    targets = torch.arange(len(spec))
    for cross_after in (None, []):
        s2 = Stage2(tiny_cfg(stage2_cross_after=cross_after), spec)
        lora = s2.lora(s2(base, targets, cond, mask, None), targets)
        assert [tuple(a.shape) for a, _, _ in lora.values()] == [(2, 4, s[1]) for s in MIXED_SHAPES.values()]
        assert [tuple(b.shape) for _, b, _ in lora.values()] == [(2, s[0], 4) for s in MIXED_SHAPES.values()]


def test_predicted_delta_scales_with_the_base_weights():
    """Tokens see W / rms(W); B carries rms(W) back, so scaling W scales the predicted ΔW by the same factor."""
    spec, _, base = mixed_base()
    _, _, base3 = mixed_base(scale=3.0)
    s1, s2 = random_stage2(tiny_cfg(), spec)
    cond, mask = condition()
    targets = torch.arange(len(spec))

    def delta_of(b):
        f = s1(b, targets, cond, mask, decode_map=False).features
        out = s2(b, targets, cond, mask, f)
        return out.B @ out.A

    torch.testing.assert_close(delta_of(base3), 3 * delta_of(base), rtol=1e-4, atol=1e-7)


def test_stage2_losses_and_diffusion_hook():
    spec, weights, base = mixed_base()
    _, s2 = random_stage2(tiny_cfg(), spec)
    s2.train()
    cond, mask = condition()
    targets = torch.arange(len(spec))
    pred = s2.lora(s2(base, targets, cond, mask), targets)
    g = torch.Generator().manual_seed(3)
    true = {k: (torch.randn(2, 2, A.shape[-1], generator=g), torch.randn(2, B.shape[1], 2, generator=g), 1.0)
            for k, (A, B, _) in pred.items()}
    w_rms = {n: base.rms[i] for i, n in enumerate(spec.names)}
    seen = {}

    def diffusion_loss_fn(lora, batch):
        # stands in for the frozen generator: functional_call of a module holding the targets with W + ΔW
        seen.update(lora)
        lin = torch.nn.Linear(16, 16, bias=False)
        name = spec.names[0]
        A, B, alpha = lora[name]
        w = weights[name] + alpha / A.shape[-2] * (B[0] @ A[0])
        x = torch.ones(3, 16)
        return torch.func.functional_call(lin, {"weight": w}, (x,)).square().mean() * batch

    loss, metrics = stage2_loss(pred, true, w_rms, lambda_recon=2.0, lambda_diff=10.0,
                                diffusion_loss_fn=diffusion_loss_fn, batch=1.0)
    assert set(seen) == set(pred) and all(seen[k][0] is pred[k][0] for k in pred)
    assert loss.item() == pytest.approx(2.0 * metrics["recon"] + 10.0 * metrics["diffusion"], rel=1e-5)
    loss.backward()
    assert s2.lora_head.b.weight.grad.abs().sum() > 0
    assert s2.backbone.blocks[0].mlp1.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(LofaError, match="diffusion_loss_fn"):
        stage2_loss(pred, true, w_rms, lambda_diff=1.0)


def test_delta_l1_checkpointed_matches_plain_and_factor_l1():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    B = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    At, Bt = torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, 3, generator=g)
    loss = delta_l1((A, B, 6.0), (At, Bt, torch.tensor([3.0, 3.0])), torch.tensor(2.0))
    loss.backward()
    ga, gb = A.grad.clone(), B.grad.clone()
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = (2.0 * B2 @ A2 - 1.0 * Bt @ At).abs().mean() / 2.0
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ga, A2.grad)
    torch.testing.assert_close(gb, B2.grad)
    assert factor_l1((At, Bt, 3.0), (At, Bt, 3.0)) == 0
    with pytest.raises(LofaError, match="equal ranks"):
        factor_l1((A, B, 1.0), (At[:, :2], Bt[:, :, :2], 1.0))


# --- predictor ----------------------------------------------------------------------------------------------------

def test_predictor_round_trip_merge_and_lora_file(tmp_path):
    from lofa.lora.formats import load_lora

    spec, weights, base = mixed_base()
    s1, s2 = random_stage2(tiny_cfg(), spec)
    save_pretrained(tmp_path / "ckpt", s2, s1, condition_encoder={"kind": "text", "max_length": 8})
    lofa = LoFA.from_pretrained(tmp_path / "ckpt", base_weights=weights)
    cond, mask = condition(n=1, valid=(4,))
    lora = lofa.predict(cond[0], mask[0])
    assert list(lora) == spec.names
    targets = torch.arange(len(spec))
    f = s1(base, targets, cond, mask, decode_map=False).features
    ref = s2.lora(s2(base, targets, cond, mask, f), targets)
    for name, factor in lora.items():
        A, B, alpha = ref[name]
        torch.testing.assert_close(factor.A, A[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(factor.B, B[0], rtol=1e-4, atol=1e-7)
        assert factor.alpha == 8.0 and factor.shape == spec.targets[spec.index[name]].shape
    assert {"stage1_ms", "stage2_ms", "prefix_ms"} <= set(lofa.timings)
    # merge: per-name and the fused per-shape-group merge agree with W + (alpha / r) B A
    merged = {k: v.clone() for k, v in weights.items()}
    merge_lora_(merged, lora)
    lofa.merge_(lofa.predict_factors(cond, mask))
    for i, name in enumerate(spec.names):
        expect = weights[name] + lora[name].delta_w
        torch.testing.assert_close(merged[name], expect, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lofa.base[i], expect, rtol=1e-5, atol=1e-7)
    # the written LoRA reads back as the same ΔW
    from lofa.lora.formats import save_lora

    save_lora(tmp_path / "pred.safetensors", lora)
    back, _ = load_lora(tmp_path / "pred.safetensors")
    for name in spec.names:
        torch.testing.assert_close(back[name].delta_w, lora[name].delta_w, rtol=1e-5, atol=1e-8)
    with pytest.raises(LofaError, match="width"):
        lofa.predict(torch.zeros(4, 7))


def test_cli_predict_writes_a_lora_diffusers_loads(tmp_path, capsys):
    """Text-conditioned checkpoint over a real (tiny) Wan DiT: `lofa predict` -> file -> diffusers, no key left."""
    from lofa.commands import predict as cli_predict
    from lofa.models.video_dit import VideoDiTConfig, make_video_dit

    torch.manual_seed(0)
    net = make_video_dit(VideoDiTConfig(num_layers=2, num_heads=2, head_dim=8, ffn_dim=32, text_dim=384))
    net.save_pretrained(tmp_path / "base", safe_serialization=True)
    spec = TargetSpec.from_module(net)
    _, s2 = random_stage2(tiny_cfg(cond_dim=384), spec)
    save_pretrained(tmp_path / "ckpt", s2, None, condition_encoder={"kind": "text", "max_length": 8},
                    base="../base")
    out = tmp_path / "pred.safetensors"
    args = argparse.Namespace(checkpoint=str(tmp_path / "ckpt"), prompt="a person waves the left arm",
                              image=None, pose=None, out=str(out), device="cpu")
    assert cli_predict(args) == 0
    printed = capsys.readouterr().out
    assert "stage II" in printed and "write" in printed
    lofa = LoFA.from_pretrained(tmp_path / "ckpt")
    tokens, mask = lofa.encode_condition(prompt="a person waves the left arm")
    lora = lofa.predict(tokens, mask)
    net.load_lora_adapter(str(out), adapter_name="pred", prefix="transformer")
    for name in spec.names:
        module = net.get_submodule(name)
        peft_delta = module.scaling["pred"] * module.lora_B["pred"].weight @ module.lora_A["pred"].weight
        torch.testing.assert_close(peft_delta, lora[name].delta_w, rtol=1e-4, atol=1e-7)
    lora_modules = {n.removesuffix(".lora_A") for n, _ in net.named_modules() if n.endswith(".lora_A")}
    assert lora_modules == set(spec.names)


# --- benchmark ----------------------------------------------------------------------------------------------------

def test_flop_count_matches_the_reference_estimate():
    from lofa.bench.latency import bench_targets, stage_flops

    cfg = HyperConfig()
    spec = bench_targets("paper")
    assert len(spec) == 240 and {t.shape for t in spec.targets} == {(1536, 1536)}
    f = stage_flops(cfg, spec, n_cond=512, stage=1)
    assert 12e12 < f["prefix"] + f["condition"] < 16e12  # ≈14 TFLOP per stage, the estimate for the paper configuration


def test_bench_latency_smoke_cpu(tmp_path, capsys):
    from lofa.bench.latency import cli_bench_latency

    out = tmp_path / "bench.json"
    args = argparse.Namespace(preset="smoke", device="cpu", runs=20, compile=True, json_out=str(out))
    assert cli_bench_latency(args) == 0
    text = capsys.readouterr().out
    assert "Stage I" in text and "merge" in text and "total" in text
    result = json.loads(out.read_text())
    assert result["runs"] == 20 and len(result["samples_ms"]["total"]) == 20
    assert all(result["median_ms"][k] > 0 for k in ("stage1", "stage2", "merge", "total"))
    assert result["compiled_vs_eager_rel_error"] == 0.0  # compile is CUDA-only; CPU runs eager
    with pytest.raises(LofaError, match="at least 20"):
        cli_bench_latency(argparse.Namespace(preset="smoke", device="cpu", runs=5, compile=False, json_out=None))



def test_bench_train_and_activate_smoke_cpu(tmp_path, capsys):
    """`lofa bench train` / `activate` at smoke shapes on the CPU: every figure printed and written."""
    from lofa.cli import main

    out = tmp_path / "train.json"
    assert main(["bench", "train", "--preset", "smoke", "--device", "cpu", "--clip", "5x32x32", "--steps", "3",
                 "--stage1-batch", "2", "--stage2-batch", "1", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["latent"] == [3, 2, 4, 4] and result["dit_tokens"] == 1  # smoke DiT: pixels, (2, 4, 4) patches
    for stage in ("stage1", "stage2"):
        assert len(result[stage]["samples_s"]) == 3 and result[stage]["seconds_per_step"] > 0
        assert result[stage]["hours_for_authors_steps"] == pytest.approx(
            20_000 * result[stage]["seconds_per_step"] / 3600)
    assert result["stage2"]["batch"] == 1 and result["stage2"]["matrices"] == result["targets"]
    out = tmp_path / "activate.json"
    assert main(["bench", "activate", "--preset", "smoke", "--device", "cpu", "--runs", "5",
                 "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["samples_ms"]["total_ms"]) == 5 and result["median_ms"]["write_ms"] > 0
    text = capsys.readouterr().out
    assert "h for 20k steps" in text and "encoded condition -> active adapter" in text
    assert main(["bench", "train", "--preset", "smoke", "--device", "cpu", "--clip", "4x32x32"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path is CUDA's (the CPU kernel uses erf GELU)")
def test_fused_gelu_epilogue_is_the_mlp_function():
    """MLP's GPU inference path (bias + tanh-GELU in the GEMM epilogue) computes what its training path computes."""
    from lofa.hypernet.model import MLP

    torch.manual_seed(0)
    mlp = MLP(64, 4.0).cuda()
    x = torch.randn(3, 50, 64, device="cuda")
    with torch.no_grad():
        fused = mlp(x)
    with torch.enable_grad():
        plain = mlp(x.requires_grad_())
    assert torch.allclose(fused, plain, atol=1e-5)


def test_attention_is_per_head_softmax_attention_with_key_mask():
    """SelfAttention / CrossAttention against attention written out head by head (catches head mixing in the
    [B, L, H, Dh] layout the modules hand to SDPA), masked keys excluded."""
    from lofa.hypernet.model import CrossAttention, SelfAttention

    torch.manual_seed(0)
    d, H = 24, 3
    for module in (SelfAttention(d, H, qk_norm=True), CrossAttention(d, H, qk_norm=True)):
        x, ctx = torch.randn(2, 5, d), torch.randn(2, 7, d)
        mask = torch.ones(2, 7 if isinstance(module, CrossAttention) else 5, dtype=torch.bool)
        mask[1, -2:] = False
        if isinstance(module, SelfAttention):
            out = module(x, mask)
            q, k, v = module.qkv(x).chunk(3, dim=-1)
        else:
            out = module(x, ctx, mask)
            q, (k, v) = module.q(x), module.kv(ctx).chunk(2, dim=-1)
        heads = []
        for h in range(H):
            sl = slice(h * d // H, (h + 1) * d // H)
            qh, kh = module.q_norm(q[..., sl]), module.k_norm(k[..., sl])
            scores = qh @ kh.transpose(1, 2) / (d // H) ** 0.5
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
            heads.append(scores.softmax(-1) @ v[..., sl])
        torch.testing.assert_close(out, module.out(torch.cat(heads, dim=-1)), atol=1e-5, rtol=1e-5)


# --- where Stage II's prediction starts ------------------------------------------------------------------------
def mean_start(spec, rank=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {t: (torch.randn(rank, target.shape[1], generator=g) * 0.1, torch.randn(target.shape[0], rank, generator=g)
                * 0.01) for t, target in enumerate(spec.targets)}


def test_a_mean_start_predicts_the_start_factors_exactly_and_both_projections_learn():
    spec, weights, base = mixed_base()
    s1, s2 = random_stage2(tiny_cfg(), spec)
    start = mean_start(spec)
    s2.lora_head.set_start(start)
    cond, mask = condition()
    targets = torch.arange(len(spec))
    f = s1(base, targets, cond, mask, decode_map=False).features
    lora = s2.lora(s2(base, targets, cond, mask, f), targets)
    for t, name in enumerate(spec.names):
        A, B, _ = lora[name]
        for i in range(2):  # every condition starts at the same factors
            torch.testing.assert_close(A[i], start[t][0], rtol=0, atol=0)
            torch.testing.assert_close(B[i], start[t][1], rtol=0, atol=0)
    # a step of any loss reaches both zeroed projections (A = A0 + Â and B = B0 + B̂ with A0, B0 nonzero)
    loss = sum((B @ A).square().sum() for A, B, _ in lora.values())
    loss.backward()
    assert s2.lora_head.a.weight.grad.abs().sum() > 0 and s2.lora_head.b.weight.grad.abs().sum() > 0


def test_the_start_factors_are_saved_and_loaded_and_a_zero_start_saves_none(tmp_path):
    spec, weights, _ = mixed_base()
    s1, s2 = random_stage2(tiny_cfg(), spec)
    assert not any("start" in k for k in s2.state_dict())  # the paper's head: same files as before
    save_pretrained(tmp_path / "zero", s2, s1, condition_encoder={"kind": "text", "max_length": 8})
    s2.lora_head.set_start(mean_start(spec))
    with torch.no_grad():
        s2.lora_head.b.weight.normal_(0, 0.05)  # a trained residual on top of the start
    save_pretrained(tmp_path / "mean", s2, s1, condition_encoder={"kind": "text", "max_length": 8})
    cond, mask = condition(n=1, valid=(4,))
    zero = LoFA.from_pretrained(tmp_path / "zero", base_weights=weights).predict(cond[0], mask[0])
    mean = LoFA.from_pretrained(tmp_path / "mean", base_weights=weights).predict(cond[0], mask[0])
    targets = torch.arange(len(spec))
    _, _, base = mixed_base()
    f = s1(base, targets, cond, mask, decode_map=False).features
    ref = s2.lora(s2(base, targets, cond, mask, f), targets)
    for name in spec.names:
        torch.testing.assert_close(mean[name].B, ref[name][1][0], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(mean[name].B, zero[name].B)


def test_a_per_target_head_starts_at_its_start_gets_gradient_only_for_its_targets_and_round_trips(tmp_path):
    """lora_head="per_target": zero per-target layers at set_start (the prediction is the start factors exactly), a
    loss on some targets reaches only their layers, and the layers are saved and loaded with the predictor."""
    spec, weights, base = mixed_base()
    s1, s2 = random_stage2(tiny_cfg(lora_head="per_target"), spec)
    head = s2.lora_head
    assert head.a_per_target.shape == (len(spec), TINY["d_model"], TINY["patch"] * TINY["rank"])
    start = mean_start(spec)
    head.set_start(start)
    cond, mask = condition()
    targets = torch.tensor([0, 2])
    f = s1(base, targets, cond, mask, decode_map=False).features
    lora = s2.lora(s2(base, targets, cond, mask, f), targets)
    for j, t in enumerate(targets.tolist()):
        A, B, _ = lora[spec.names[t]]
        torch.testing.assert_close(A[0], start[t][0], rtol=0, atol=0)
        torch.testing.assert_close(B[1], start[t][1], rtol=0, atol=0)
    sum((B @ A).square().sum() for A, B, _ in lora.values()).backward()
    touched = head.a_per_target.grad.flatten(1).abs().sum(1) > 0
    assert touched.tolist() == [t in (0, 2) for t in range(len(spec))]
    assert (head.b_per_target.grad.flatten(1).abs().sum(1) > 0).tolist() == touched.tolist()
    with torch.no_grad():
        head.a_per_target.normal_(0, 0.05)
        head.b_per_target.normal_(0, 0.05)
    save_pretrained(tmp_path / "m", s2, s1, condition_encoder={"kind": "text", "max_length": 8})
    loaded = LoFA.from_pretrained(tmp_path / "m", base_weights=weights)
    assert loaded.cfg.lora_head == "per_target"
    got = loaded.predict(cond[0], mask[0])
    every = torch.arange(len(spec))
    ref = s2.lora(s2(base, every, cond, mask, s1(base, every, cond, mask, decode_map=False).features), every)
    for name in spec.names:
        torch.testing.assert_close(got[name].B, ref[name][1][0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[name].A, ref[name][0][0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="lora_head"):
        tiny_cfg(lora_head="big")


def test_the_start_refuses_factors_of_another_rank():
    spec, _, _ = mixed_base()
    _, s2 = random_stage2(tiny_cfg(), spec)
    with pytest.raises(LofaError, match="rank"):
        s2.lora_head.set_start(mean_start(spec, rank=3))


def test_squared_delta_error_is_the_mean_squared_relative_error():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 3, 5, generator=g, requires_grad=True), torch.randn(2, 4, 3, generator=g)
    At, Bt = torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, 3, generator=g)
    w_rms = torch.tensor(0.5)
    err = 2.0 * (B @ A) - 1.0 * (Bt @ At)  # alpha / r = 6 / 3 and 3 / 3
    mse = stage2_loss({"m": (A, B, 6.0)}, {"m": (At, Bt, 3.0)}, {"m": w_rms}, recon="delta_mse")[0]
    torch.testing.assert_close(mse, (err / w_rms).square().mean())
    mse.backward()
    assert A.grad.abs().sum() > 0
    with pytest.raises(LofaError, match="unknown recon"):
        stage2_loss({"m": (A, B, 6.0)}, {"m": (At, Bt, 3.0)}, {"m": w_rms}, recon="l2")


def test_condition_standardisation_is_fitted_on_valid_tokens_and_saved():
    spec, _, base = mixed_base()
    s1 = Stage1(tiny_cfg(), spec).eval()
    cond, mask = condition(n=2, k=6, valid=(3, 5))
    shifted = cond * 3.0 + 7.0
    before = s1(base, torch.arange(len(spec)), cond, mask).features
    s1.backbone.set_condition_stats(shifted, mask)
    valid = shifted[mask]
    torch.testing.assert_close(s1.backbone.cond_shift, valid.mean(0))
    torch.testing.assert_close(s1.backbone.cond_scale, valid.std(0))
    # the standardisation undoes an affine change of the condition channels exactly when fitted on the same tokens
    s1.backbone.set_condition_stats(cond, mask)
    ref = s1(base, torch.arange(len(spec)), cond, mask).features
    s1.backbone.set_condition_stats(shifted, mask)
    torch.testing.assert_close(s1(base, torch.arange(len(spec)), shifted, mask).features, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref, before)
    # saved and loaded with the weights; a state dict from before the standardisation loads as the identity
    state = s1.state_dict()
    fresh = Stage1(tiny_cfg(), spec)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.backbone.cond_shift, s1.backbone.cond_shift)
    old = {k: v for k, v in state.items() if not k.endswith(("cond_shift", "cond_scale"))}
    fresh.load_state_dict(old)
    assert fresh.backbone.cond_shift.abs().sum() == 0 and (fresh.backbone.cond_scale == 1).all()


def test_gram_form_squared_error_matches_the_dense_one():
    from lofa.hypernet.losses import delta_mse
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 4, 24, generator=g, requires_grad=True)
    B = torch.randn(3, 40, 4, generator=g, requires_grad=True)
    At, Bt = torch.randn(3, 2, 24, generator=g), torch.randn(3, 40, 2, generator=g)  # another rank: fine
    alpha_t = torch.tensor([1.0, 2.0, 3.0])
    fast = delta_mse((A, B, 4.0), (At, Bt, alpha_t), torch.tensor(0.3))
    dense = ((4.0 / 4 * B @ A - (alpha_t / 2)[:, None, None] * (Bt @ At)) / 0.3).square().mean()
    torch.testing.assert_close(fast, dense, rtol=1e-4, atol=1e-6)
    grads = torch.autograd.grad(fast, (A, B))
    for a, b in zip(grads, torch.autograd.grad(dense, (A, B))):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_activate_puts_the_predicted_lora_into_a_live_diffusers_model():
    """LoFA.activate: the adapter it adds (then overwrites in place) computes what the merged ΔW does."""
    import copy

    from lofa.models.video_dit import VideoDiTConfig, make_video_dit

    torch.manual_seed(0)
    net = make_video_dit(VideoDiTConfig(num_layers=2, num_heads=2, head_dim=8, ffn_dim=32, text_dim=12,
                                        zero_init_output=False)).eval()
    spec = TargetSpec.from_module(net)
    weights = {n: net.get_submodule(n).weight.detach().clone() for n in spec.names}
    s1, s2 = random_stage2(tiny_cfg(cond_dim=12, patch=8), spec)
    lofa = LoFA(s2, s1)
    lofa.set_base(weights)
    x, t, context = torch.randn(1, 3, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 4, 12)
    base_out = net(x, t, context, return_dict=False)[0]
    outputs = []
    for seed in (1, 2):  # the second call overwrites the adapter's factors (a hotswap)
        tokens, mask = condition(n=1, valid=(5,), seed=seed)
        lofa.activate(net, tokens, mask)
        reference = copy.deepcopy(net)
        reference.disable_adapters()
        merge_lora_({n: reference.get_submodule(f"{n}.base_layer").weight for n in spec.names},
                    lofa.predict(tokens, mask))
        with torch.no_grad():
            outputs.append(net(x, t, context, return_dict=False)[0])
            assert torch.allclose(outputs[-1], reference(x, t, context, return_dict=False)[0], atol=1e-5)
    assert "add_adapter_ms" in lofa.timings and lofa.timings["write_ms"] >= 0
    assert not torch.allclose(outputs[0], base_out, atol=1e-4) and not torch.allclose(outputs[0], outputs[1], atol=1e-4)
