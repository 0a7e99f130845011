"""The paper's Table 4 ablations (`lofa.hypernet.recipe.train_ablation`, `Run.hypernet` variants "no_response",
"lightweight", "prompt_input"): what each one is, that each learns with Stage II's loop, that its LoRA loads into
diffusers, and that LoFA's own path is what it was before they existed (a smoke world, a smoke generator and zoos
of synthetic LoRA files; tiny CPU sizes)."""
import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from test_diffusers_loading import check_loaded, key_warnings  # noqa: F401 (key_warnings is a fixture)
from test_hypernet_data import CFG, RANK, StubText, fake_zoo

from lofa import seeds
from lofa.hypernet import HyperConfig, LoFA, Stage1, Stage2, save_pretrained
from lofa.hypernet.data import Triplets
from lofa.hypernet.losses import stage2_loss
from lofa.hypernet.model import JointStages
from lofa.hypernet.recipe import ABLATIONS, train_ablation, train_stage1, train_stage2
from lofa.hypernet.train import Stage2TrainConfig, TrainConfig
from lofa.lora.formats import LoraFactor, save_lora
from lofa.models.generator import Generator
from lofa.worlds import make_world

pytestmark = pytest.mark.usefixtures("one_thread")

HYPER = dict(d_model=16, n_heads=2, depth=2, patch=16, rank=RANK, alpha=float(RANK), cond_dim=StubText.dim,
             cond_len=12, map_rank=4)
STEPS = 60
PARTS = ("left_arm", "left_leg", "right_arm")


def part_factor(case, name, shape, g):
    """A zoo LoRA set by the case's body part: per target one A and one B of each part, so a case's LoRA is
    predictable from the words of its prompt ("left", "right", "arm", "leg")."""
    out_f, in_f = shape
    gn = torch.Generator().manual_seed(sum(map(ord, name)))
    a = torch.randn(RANK, in_f, generator=gn) * 0.3
    b = torch.randn(len(PARTS), out_f, RANK, generator=gn) * 0.05
    return LoraFactor(a, b[PARTS.index(case.attrs["part"])], float(RANK))


@pytest.fixture(scope="module")
def world_gen():
    torch.manual_seed(0)
    world = make_world("actions", "smoke")
    gen = Generator.build("video_dit", "smoke", {"text_dim": StubText.dim, "zero_init_output": False}).eval()
    return world, gen


@pytest.fixture(scope="module")
def data(world_gen, tmp_path_factory):
    world, gen = world_gen
    zoo = fake_zoo(tmp_path_factory.mktemp("zoo"), world, gen, factor=part_factor)
    return Triplets(world, zoo, gen, "text", CFG, text=StubText(), seed=3)


def stage2_config(steps: int) -> Stage2TrainConfig:
    return Stage2TrainConfig(steps=steps, warmup_steps=2, batch_size=4, checkpoint_every=steps, lr=5e-3,
                             lambda_diff=0.0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """{ablation: (stage2, stage1 or None, history)}, each trained STEPS steps from run seed 0."""
    cfg = HyperConfig(**HYPER, lora_head="per_target")
    out = {}
    for name in ABLATIONS:
        folder = tmp_path_factory.mktemp(name)
        stage2, stage1 = train_ablation(name, data, cfg, stage2_config(STEPS), folder, device="cpu", seed=0,
                                        progress=False)
        out[name] = stage2, stage1, json.loads((folder / "history.json").read_text())
    return out


def train_loss(data, stage2, stage1=None) -> float:
    """Stage II's reconstruction term over every training case (view 0) for the model's prediction."""
    model = stage2 if stage1 is None else JointStages(stage1, stage2)
    batch = data.batch(data.train_ids)
    with torch.no_grad():
        pred = model.lora(model(data.base, batch.targets, batch.cond, batch.cond_mask), batch.targets)
    w_rms = {n: data.base.rms[t] for t, n in enumerate(data.spec.names)}
    return float(stage2_loss(pred, batch.loras, w_rms, recon="delta_mse", lambda_diff=0.0)[0])


def mean_lora_loss(data) -> float:
    """The same term for the mean training LoRA, where every ablation starts (train.start == "mean")."""
    batch = data.batch(data.train_ids)
    n = len(data.train_ids)
    pred = {data.spec.names[t]: (a[None].expand(n, -1, -1), b[None].expand(n, -1, -1), float(RANK))
            for t, (a, b) in data.mean_factors().items()}
    w_rms = {n: data.base.rms[t] for t, n in enumerate(data.spec.names)}
    return float(stage2_loss(pred, batch.loras, w_rms, recon="delta_mse", lambda_diff=0.0)[0])


# --- each ablation learns with Stage II's loop -------------------------------------------------------------------

def test_each_ablation_learns_from_the_mean_lora_on_the_same_batches(data, trained):
    start = mean_lora_loss(data)
    firsts = []
    for name, (stage2, stage1, history) in trained.items():
        assert len(history) == STEPS and "recon" in history[-1] and "bce" not in history[-1], name
        firsts.append(history[0]["loss"])
        losses = [h["loss"] for h in history]
        assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5, (name, losses)
        assert train_loss(data, stage2, stage1) < 0.8 * start, name
    # the same first batch, and every ablation starts at the mean LoRA: the same first loss
    assert firsts == pytest.approx([firsts[0]] * len(firsts), rel=1e-6)


# --- what each ablation is ---------------------------------------------------------------------------------------

def test_no_ablation_computes_or_supervises_a_response_map(data, tmp_path, monkeypatch):
    """No BCE and no map decoder run while any ablation trains (the LoFA recipe's Stage I would call both)."""
    import lofa.hypernet.model as model_module
    import lofa.hypernet.train as train_module

    def refuse(*args, **kwargs):
        raise AssertionError("a response map was decoded or supervised")

    monkeypatch.setattr(train_module, "stage1_loss", refuse)
    monkeypatch.setattr(model_module.ResponseMapHead, "forward", refuse)
    for name in ABLATIONS:
        train_ablation(name, data, HyperConfig(**HYPER), stage2_config(2), tmp_path / name, device="cpu", seed=0,
                       progress=False)
    with pytest.raises(AssertionError, match="response map"):  # the patch does catch LoFA's Stage I
        train_stage1(data, HyperConfig(**HYPER), TrainConfig(steps=1, warmup_steps=1, batch_size=2,
                                                             matrices_per_sample=2), tmp_path / "stage1",
                     device="cpu", seed=0, progress=False)


def test_no_response_is_one_stage_trained_from_scratch(data, trained):
    stage2, stage1, _ = trained["no_response"]
    assert stage1 is None and stage2.cfg.feature_cross_after == [] and len(stage2.backbone.feature_cross) == 0
    assert stage2.cfg.input_tokens == "weights"
    # LoFA's Stage II less its feature cross-attention, and its initial weights are an untrained Stage I's backbone
    lofa2 = Stage2(HyperConfig(**HYPER, lora_head="per_target"), data.spec)
    cross = sum(p.numel() for p in lofa2.backbone.feature_cross.parameters())
    assert sum(p.numel() for p in stage2.parameters()) == sum(p.numel() for p in lofa2.parameters()) - cross
    torch.manual_seed(seeds.stream(0, "hypernet.init"))
    fresh = Stage2(stage2.cfg, data.spec).backbone.blocks.state_dict()
    torch.manual_seed(seeds.stream(0, "hypernet.init"))
    untrained_stage1 = Stage1(HyperConfig(**HYPER), data.spec).backbone.blocks.state_dict()
    assert all(torch.equal(fresh[k], untrained_stage1[k]) for k in fresh)
    assert any(not torch.equal(fresh[k], v) for k, v in stage2.backbone.blocks.state_dict().items())


def test_lightweight_stage1_changes_only_through_stage2s_loss(data, trained):
    """Its Stage I starts where LoFA's does (the hypernet.init seed), its map decoder never moves (it never runs:
    test above), its backbone is trained by Stage II's loss through the feature cross-attention; LoFA's parameters."""
    stage2, stage1, _ = trained["lightweight"]
    torch.manual_seed(seeds.stream(0, "hypernet.init"))
    init = Stage1(HyperConfig(**HYPER, lora_head="per_target"), data.spec)
    for k, v in init.map_head.state_dict().items():
        assert torch.equal(stage1.map_head.state_dict()[k], v), k
    blocks = stage1.backbone.blocks.state_dict()
    changed = [k for k, v in init.backbone.blocks.state_dict().items() if not torch.equal(blocks[k], v)]
    assert len(changed) > len(blocks) // 2
    assert float(stage1.map_offset) == 0.0  # no map density was fitted: there is no map to decide
    assert len(stage2.backbone.feature_cross) == len(stage2.cfg.feature_cross_after) > 0
    lofa2 = Stage2.from_stage1(init)
    assert (sum(p.numel() for p in stage1.parameters()) + sum(p.numel() for p in stage2.parameters())
            == sum(p.numel() for p in init.parameters()) + sum(p.numel() for p in lofa2.parameters()))


def test_prompt_input_never_reads_the_base_weights(data, trained):
    """Its prediction is the same, bit for bit, over random base weights of another scale; a W-reading ablation's
    is not. No parameter embeds a weight patch."""
    stage2, _, _ = trained["prompt_input"]
    assert stage2.cfg.input_tokens == "condition" and not hasattr(stage2.backbone.tokenizer, "embed")
    weights = {n: data.base[t] for t, n in enumerate(data.spec.names)}
    g = torch.Generator().manual_seed(7)
    random = {n: torch.randn(w.shape, generator=g) * 10 for n, w in weights.items()}
    tokens, mask = data.conditions("eval").get(data.heldout_ids[:3])
    for name, reads_w in (("prompt_input", False), ("no_response", True)):
        model = LoFA(trained[name][0])
        model.set_base(weights)
        a = model.predict_factors(tokens, mask)
        model.set_base(random)
        b = model.predict_factors(tokens, mask)
        same = torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert same != reads_w, name
    # and the training loop itself: Stage II's forward over the random base gives the same factors
    from lofa.hypernet.tokenizer import BaseWeights

    targets = torch.arange(len(data.spec))
    with torch.no_grad():
        out = stage2(data.base, targets, tokens, mask)
        other = stage2(BaseWeights(data.spec, random), targets, tokens, mask)
    assert torch.equal(out.A, other.A) and torch.equal(out.B, other.B)


def test_every_parameter_of_an_ablation_gets_a_gradient(data):
    """Nothing trained sits unused (a multi-process launch would refuse such a model): one step's backward reaches
    every parameter that requires a gradient; the lightweight map decoder requires none."""
    from lofa.hypernet.train import Stage2Objective

    batch = data.batch(data.train_ids[:2])
    for name in ABLATIONS:
        torch.manual_seed(0)
        cfg = HyperConfig(**HYPER)
        if name == "lightweight":
            stage1 = Stage1(cfg, data.spec)
            model = JointStages(stage1, Stage2.from_stage1(stage1))
            assert not any(p.requires_grad for p in stage1.map_head.parameters())
        else:
            single = {"stage2_cross_after": [], "input_tokens": "condition" if name == "prompt_input" else "weights"}
            model = Stage2(HyperConfig(**HYPER, **single), data.spec)
        with torch.no_grad():  # non-zero B and feature cross-attention outputs, so gradients reach everything
            for p in model.parameters():
                if p.requires_grad and not p.any():
                    p.normal_(0, 0.1)
        loss, _ = Stage2Objective(data.base, stage2_config(1))(model, batch)
        loss.backward()
        missing = [k for k, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
        assert not missing, (name, missing)


def test_prompt_input_gradient_checkpointing_gives_the_same_gradients(data):
    from lofa.hypernet.train import Stage2Objective

    batch = data.batch(data.train_ids[:2])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Stage2(HyperConfig(**HYPER, stage2_cross_after=[], input_tokens="condition",
                                   grad_checkpoint=checkpointing), data.spec)
        with torch.no_grad():
            model.lora_head.b.weight.normal_(0, 0.1)
        loss, _ = Stage2Objective(data.base, stage2_config(1))(model, batch)
        loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-4, atol=1e-7, msg=k)


# --- the predicted LoRA is a standard one ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ABLATIONS)
def test_an_ablations_lora_saves_and_loads_into_the_diffusers_base(name, data, world_gen, trained, tmp_path,
                                                                    key_warnings):  # noqa: F811
    _, gen = world_gen
    stage2, stage1, _ = trained[name]
    save_pretrained(tmp_path / "ckpt", stage2, stage1, condition_encoder={"kind": "text", "max_length": 12})
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["stages"] == (["stage1", "stage2"] if name == "lightweight" else ["stage2"])
    weights = {n: data.base[t] for t, n in enumerate(data.spec.names)}
    model = LoFA.from_pretrained(tmp_path / "ckpt", base_weights=weights)
    tokens, mask = data.conditions("eval").get(data.heldout_ids[:1])
    lora = model.predict(tokens, mask)
    in_memory = LoFA(stage2, stage1)
    in_memory.set_base(weights)
    for n, f in in_memory.predict(tokens, mask).items():
        torch.testing.assert_close(lora[n].delta_w, f.delta_w)
    save_lora(tmp_path / "pred.safetensors", lora)
    adapted = copy.deepcopy(gen.net)
    adapted.load_lora_adapter(load_file(tmp_path / "pred.safetensors"), prefix="transformer", adapter_name="x")
    check_loaded(gen.net, adapted, lora, key_warnings)


# --- LoFA's own path is unchanged --------------------------------------------------------------------------------

def state_hash(*modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        for k, v in module.state_dict().items():
            h.update(k.encode())
            h.update(str(tuple(v.shape)).encode())
            h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_lofa_builds_trains_and_predicts_as_before_the_ablations(world_gen, tmp_path):
    """LoFA's parameters (bit for bit), its losses and its prediction as the code before the ablations gave them
    (values recorded from that commit, one thread): Stage I and Stage II through the recipe on the default fake zoo."""
    world, gen = world_gen
    data = Triplets(world, fake_zoo(tmp_path / "zoo", world, gen), gen, "text", CFG, text=StubText(), seed=3)
    cfg = HyperConfig(**HYPER)
    torch.manual_seed(0)
    stage1 = Stage1(cfg, data.spec)
    stage2 = Stage2.from_stage1(stage1)
    assert state_hash(stage1, stage2) == "eca8449f5a5e4c53"
    assert stage2.lora_head.b_unit is None and "b_unit" not in stage2.state_dict()
    t1 = TrainConfig(steps=3, warmup_steps=1, batch_size=4, matrices_per_sample=4, checkpoint_every=3, lr=1e-3)
    t2 = Stage2TrainConfig(steps=3, warmup_steps=1, batch_size=4, checkpoint_every=3, lr=1e-3, lambda_diff=0.0)
    stage1 = train_stage1(data, cfg, t1, tmp_path / "s1", device="cpu", seed=0, progress=False)
    stage2 = train_stage2(data, stage1, t2, tmp_path / "s2", device="cpu", seed=0, progress=False)
    losses = [[h["loss"] for h in json.loads((tmp_path / s / "history.json").read_text())] for s in ("s1", "s2")]
    assert losses[0] == pytest.approx([0.6710420846939087, 0.662696361541748, 0.6550990343093872], rel=1e-6)
    assert losses[1] == pytest.approx([0.0894918143749237, 0.08729082345962524, 0.08842351287603378], rel=1e-6)
    model = LoFA(stage2, stage1)
    model.set_base({n: data.base[t] for t, n in enumerate(data.spec.names)})
    batch = data.batch(data.heldout_ids[:2], split="eval")
    out = model.predict_factors(batch.cond, batch.cond_mask)
    sums = [float(out.A.double().abs().sum()), float(out.B.double().abs().sum()), float((out.B @ out.A).double().sum())]
    assert sums == pytest.approx([223.17328879490378, 37.19904135640536, -0.5087588586991041], rel=1e-6)


# --- the pipeline ------------------------------------------------------------------------------------------------

def test_run_hypernet_trains_each_ablation_without_lofas_stage1(tmp_path):
    """Run.hypernet(setting, variant=...) at smoke: each ablation trains with Stage II's loop and config (its
    history has Stage II's steps), writes a predictor folder the LoFA class loads, and trains no Stage I on response
    maps (LoFA's stage1 folder is never made); stage 1 of an ablation is refused."""
    from lofa.errors import LofaError
    from lofa.run import Run

    run = Run("smoke", "cpu", 0, tmp_path)
    steps = run.config(Stage2TrainConfig).steps
    for name in ABLATIONS:
        model = run.hypernet("identities", 2, name, progress=False)
        assert isinstance(model, LoFA) and (model.stage1 is None) == (name != "lightweight")
        assert len(run.hypernet_history("identities", 2, name)) == steps
        with pytest.raises(LofaError, match="no Stage I trained on response maps"):
            run.hypernet("identities", 1, name)
    assert model.cfg.input_tokens == "condition"
    assert not (tmp_path / "hypernet" / "identities" / "lofa").exists()
