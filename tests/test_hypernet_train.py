"""Training the hypernetwork: checkpointed gradients, fp32 master weights under bf16, optimizer groups, schedule,
and resume after an interruption (tiny CPU sizes)."""
import pytest
import torch

from lofa.errors import LofaError
from lofa.hypernet import BaseWeights, HyperConfig, Stage1, Stage2, TargetSpec
from lofa.hypernet.losses import delta, delta_fidelity
from lofa.hypernet.train import (MIN_LR_RATIO, LoraBatch, Stage1Objective, Stage2Monitor, Stage2Objective,
                                 TrainConfig, fit, param_groups, sample_targets)
from lofa.schedules import lr_factor, lr_scheduler

SHAPES = {f"blocks.{i}.attn1.to_{t}": (16, 16) for i in range(2) for t in ("q", "v")}
SHAPES["blocks.1.ffn.net.2"] = (16, 24)
CFG = dict(d_model=32, n_heads=2, depth=2, patch=8, rank=2, alpha=2.0, cond_dim=6, cond_len=5, map_rank=4)


def make_base(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    spec = TargetSpec.from_shapes(SHAPES)
    return spec, BaseWeights(spec, {n: torch.randn(s, generator=g, dtype=dtype) * 0.05 for n, s in SHAPES.items()})


def make_batch_fn(spec, n=2, m=None, seed=0):
    """Pure function of the step: random conditions and random true LoRAs for m sampled targets."""

    def batch_fn(step, rank):
        g = torch.Generator().manual_seed(1000 * seed + step)
        targets = sample_targets(len(spec), m, step, seed) if m else torch.arange(len(spec))
        loras = {}
        for t in targets.tolist():
            o, i = spec.targets[t].shape
            loras[spec.targets[t].name] = (torch.randn(n, 2, i, generator=g) * 0.3,
                                           torch.randn(n, o, 2, generator=g) * 0.01, 2.0)
        mask = torch.ones(n, 5, dtype=torch.bool)
        mask[0, 3:] = False
        return LoraBatch(torch.randn(n, 5, 6, generator=g), mask, targets, loras)

    return batch_fn


def stage1_and_2(dtype=torch.float32, **overrides):
    spec, base = make_base(dtype)
    torch.manual_seed(0)
    cfg = HyperConfig(**{**CFG, **overrides})
    s1 = Stage1(cfg, spec).to(dtype)
    s2 = Stage2.from_stage1(s1)
    with torch.no_grad():  # non-zero B and feature cross-attention, so every parameter gets a gradient
        for p in s2.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return spec, base, s1, s2


def all_grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    """The authors' checkpointing recomputed the last block for every position (defect 1): compare all grads."""
    spec, base, s1, s2 = stage1_and_2(torch.float64)
    batch = make_batch_fn(spec)(0, 0)
    cond = batch.cond.double()
    for model in (s1, s2):
        grads, recomputed, forward = {}, {}, {}
        for ckpt in (False, True):
            model.zero_grad()
            for m in (s1, s2):
                m.backbone.grad_checkpoint = ckpt
            calls = []
            hooks = [b.attn.register_forward_hook(lambda *a: calls.append(1)) for b in model.backbone.blocks]
            if model is s1:
                logits = model(base, batch.targets, cond, batch.cond_mask).logits
                loss = sum(x.square().mean() for x in logits)
            else:
                feats = s1(base, batch.targets, cond, batch.cond_mask, decode_map=False).features.detach()
                out = model(base, batch.targets, cond, batch.cond_mask, feats)
                loss = (out.B @ out.A).square().sum() + out.A.square().mean()
            forward[ckpt] = len(calls)
            loss.backward()
            recomputed[ckpt] = len(calls) - forward[ckpt]
            for h in hooks:
                h.remove()
            grads[ckpt] = all_grads(model)
        # attention runs once per block and token-count group; checkpointing recomputes each such call exactly once
        assert forward[True] == forward[False] and forward[True] % len(model.backbone.blocks) == 0
        assert recomputed == {False: 0, True: forward[True]}
        assert grads[False].keys() == grads[True].keys()
        n_params = sum(1 for p in model.parameters())
        assert len(grads[False]) == n_params  # every parameter is compared
        for k in grads[False]:
            torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-10, atol=1e-12, msg=k)


def test_fp32_master_weights_under_bf16_autocast(tmp_path):
    """bf16 compute, float32 weights: an update below half a bf16 ulp at 1.0 still moves the parameter (defect 2)."""
    spec, base, s1, _ = stage1_and_2()
    norm_w = s1.backbone.blocks[0].norm1.weight
    assert torch.equal(norm_w, torch.ones_like(norm_w))
    seen = []
    s1.backbone.blocks[0].mlp1.fc1.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    cfg = TrainConfig(steps=3, warmup_steps=1, lr=1e-4, checkpoint_every=3, mixed_precision="bf16",
                      matrices_per_sample=2)
    fit(s1, Stage1Objective(base, cfg), make_batch_fn(spec, m=2), cfg, tmp_path, device="cpu", progress=False)
    assert torch.bfloat16 in seen  # the compute really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in s1.parameters())
    step = (norm_w - 1).abs()
    assert (step > 0).any() and step.max() < 2**-9  # moved, by less than bf16 can represent at 1.0
    assert torch.equal(norm_w.bfloat16(), torch.ones_like(norm_w).bfloat16())


def test_no_weight_decay_on_norms_biases_embeddings():
    _, _, s1, _ = stage1_and_2()
    decay, no_decay = param_groups(s1, 0.01)
    names = {id(p): k for k, p in s1.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "backbone.blocks.0.mlp1.fc1.weight" in decayed and "backbone.tokenizer.embed.weight" in decayed
    for k in ("backbone.blocks.0.mlp1.fc1.bias", "backbone.blocks.0.norm1.weight", "backbone.tokenizer.cls",
              "backbone.tokenizer.row_pos", "backbone.tokenizer.depth_emb.weight",
              "backbone.tokenizer.type_emb.weight", "backbone.blocks.0.attn.q_norm.weight"):
        assert k in kept, k
    assert decayed | kept == set(names.values()) and not decayed & kept


def test_warmup_then_constant_or_cosine():
    assert [lr_factor(s, warmup_steps=10, total_steps=100, decay="constant") for s in (0, 4, 9, 10, 99)] == \
        [0.1, 0.5, 1.0, 1.0, 1.0]
    cos = dict(warmup_steps=10, total_steps=100, decay="cosine", min_ratio=MIN_LR_RATIO)
    assert lr_factor(10, **cos) == pytest.approx(1.0) and lr_factor(99, **cos) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(100, **cos) == lr_factor(500, **cos) == pytest.approx(0.1)  # the floor after the last step
    assert lr_factor(5, warmup_steps=0, total_steps=10) == pytest.approx(0.5)  # no warm-up: cosine to 0 from step 0
    with pytest.raises(LofaError, match="unknown lr decay 'linear'"):
        lr_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup_steps=1, total_steps=9,
                     decay="linear")


def test_the_schedule_survives_a_checkpoint():
    """The scheduler's state_dict round trip (what fit's checkpoints hold) resumes the same learning rates."""
    def run(steps, state=None):
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=2.0)
        sched = lr_scheduler(opt, warmup_steps=3, total_steps=12, decay="cosine", min_ratio=0.1)
        if state is not None:
            sched.load_state_dict(state)
        lrs = []
        for _ in range(steps):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, sched.state_dict()

    straight, _ = run(10)
    first, state = run(4)
    second, _ = run(6, state)
    assert first + second == straight


def test_stage1_objective_true_maps_follow_the_definition():
    spec, base, _, _ = stage1_and_2()
    batch = make_batch_fn(spec, m=3)(5, 0)
    obj = Stage1Objective(base, TrainConfig(), tau=0.02)
    maps = obj.true_maps(batch)
    assert len(maps) == len(batch.targets)
    for j, t in enumerate(batch.targets.tolist()):
        A, B, alpha = batch.loras[spec.targets[t].name]
        dw = alpha / 2 * B @ A
        assert maps[j].shape == (len(batch.cond), *spec.targets[t].shape)
        assert torch.equal(maps[j], dw.abs() > 0.02 * (base[t].abs() + 1e-8))


def _train_stage2(tmp_path, steps, crash_at=None, stage1=True, diffusion=True, monitor_every=0):
    """Stage II for `steps` steps; the diffusion stand-in draws from the global RNG, so resuming must restore it."""
    spec, base, s1, s2 = stage1_and_2()
    cfg = TrainConfig(steps=steps, warmup_steps=2, lr=1e-3, checkpoint_every=2, lambda_diff=0.5,
                      monitor_every=monitor_every)
    batch_fn = make_batch_fn(spec)

    def interrupted(step, rank):
        if step == crash_at:
            raise KeyboardInterrupt
        return batch_fn(step, rank)

    def diffusion_loss_fn(lora, batch):
        noise = torch.randn(())
        return sum((B @ A).square().mean() for A, B, _ in lora.values()) * (1 + 0.1 * noise)

    obj = Stage2Objective(base, cfg, s1 if stage1 else None, diffusion_loss_fn if diffusion else None)
    monitor = Stage2Monitor(obj, {"heldout": [batch_fn(100, 0)], "train": [batch_fn(0, 0), batch_fn(1, 0)]})
    history = fit(s2, obj, interrupted, cfg, tmp_path, device="cpu", progress=False, monitor=monitor)
    return s2, history


def test_resume_after_interruption_equals_uninterrupted_training(tmp_path):
    ref, ref_history = _train_stage2(tmp_path / "straight", steps=5)
    with pytest.raises(KeyboardInterrupt):
        _train_stage2(tmp_path / "resumed", steps=5, crash_at=3)  # dies after the step-2 checkpoint
    resumed, history = _train_stage2(tmp_path / "resumed", steps=5)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    assert len(history) == 5 and "diffusion" in history[-1] and "recon" in history[-1]
    assert (tmp_path / "resumed" / "history.json").exists()


def test_single_stage_ablation_trains(tmp_path):
    model, history = _train_stage2(tmp_path, steps=2, stage1=False, diffusion=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_delta_fidelity_is_the_cosine_and_norm_ratio_of_the_dense_weighted_delta():
    g = torch.Generator().manual_seed(3)
    shapes, rms = {"a": (7, 5), "b": (4, 9)}, {"a": torch.tensor(0.5), "b": torch.tensor(2.0)}
    pred = {k: (torch.randn(3, 2, i, generator=g), torch.randn(3, o, 2, generator=g), 2.0) for k, (o, i) in shapes.items()}
    true = {k: (torch.randn(3, 3, i, generator=g), torch.randn(3, o, 3, generator=g), torch.tensor([1.0, 3.0, 6.0]))
            for k, (o, i) in shapes.items()}
    cosine, ratio = delta_fidelity(pred, true, rms)
    flat = lambda lora: torch.cat([(delta(lora[k]) / rms[k]).flatten(1) for k in shapes], 1)  # noqa: E731
    p, t = flat(pred), flat(true)
    torch.testing.assert_close(cosine, torch.nn.functional.cosine_similarity(p, t, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ratio, p.norm(dim=1) / t.norm(dim=1), rtol=1e-4, atol=1e-5)
    same, one = delta_fidelity(true, true, rms)
    torch.testing.assert_close(same, torch.ones(3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one, torch.ones(3), rtol=1e-4, atol=1e-4)


def test_monitoring_records_learning_curves_without_changing_training(tmp_path):
    plain, plain_history = _train_stage2(tmp_path / "plain", steps=5)
    watched, history = _train_stage2(tmp_path / "watched", steps=5, monitor_every=2)
    for (k, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in history] == [h["loss"] for h in plain_history]
    measured = [h["step"] for h in history if "heldout_cosine" in h]
    assert measured == [1, 2, 4, 5] and not any("heldout_cosine" in h for h in plain_history)
    for h in history:
        if "heldout_cosine" in h:
            assert -1 <= h["heldout_cosine"] <= 1 and -1 <= h["train_cosine"] <= 1 and h["train_magnitude"] > 0
    # the curve moves as the model trains (the stand-in LoRAs are random, so only a change is certain)
    assert history[0]["train_cosine"] != history[-1]["train_cosine"]


def test_stage1_decides_at_the_training_density():
    spec, base, s1, _ = stage1_and_2()
    logits = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    assert s1.decide(logits).tolist() == [False, False, True, True]     # unfitted: logit 0
    s1.set_map_density(0.9)                                               # log(0.9 / 0.1) = 2.197
    assert float(s1.map_offset) == pytest.approx(2.1972246)
    assert s1.decide(logits).tolist() == [False, True, True, True]
    assert s1.decide(logits, calibrated=False).tolist() == [False, False, True, True]
    with pytest.raises(LofaError, match="strictly between 0 and 1"):
        s1.set_map_density(1.0)
    # saved and restored with the weights; a file from before the calibration decides at logit 0
    state = s1.state_dict()
    fresh = stage1_and_2()[2]
    fresh.load_state_dict(state)
    assert float(fresh.map_offset) == pytest.approx(2.1972246)
    del state["map_offset"]
    fresh.load_state_dict(state)
    assert float(fresh.map_offset) == 0.0
    # the training metrics decide as the model does: a huge prior predicts every entry
    s1.set_map_density(1 - 1e-7)
    obj = Stage1Objective(base, TrainConfig(matrices_per_sample=2), tau=0.02)
    _, metrics = obj(s1, make_batch_fn(spec, m=2)(0, 0))
    assert metrics["pred_density"] == 1.0
