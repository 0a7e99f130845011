import dataclasses
import zlib
from types import SimpleNamespace

import pytest
import torch

from lofa.config import preset
from lofa.diffusion import TimeDistribution, flow_matching_loss
from lofa.errors import LofaError
from lofa.lora.batched import GroupedLora, GroupedLoraLinear, grouped_lora, multi_lora, train_lora_batch
from lofa.lora.formats import LoraFactor, load_lora, save_lora
from lofa.lora.train import CaseStream, LoraTrainConfig, apply_lora, merge_lora, merged_weights, train_lora
from lofa.models import Generator

TINY_DIT = {"patch_size": (1, 2, 2), "num_layers": 2, "num_heads": 2, "head_dim": 16, "ffn_dim": 64,
            "text_dim": 32, "freq_dim": 32, "rope_max_seq_len": 32, "zero_init_output": False}


pytestmark = pytest.mark.usefixtures("one_thread")


class StubWorld:
    """The World API at toy size: case c's clips are a fixed pattern of c plus per-render appearance noise."""

    task, modality = "identities", "video"

    def __init__(self, n_cases: int = 6, shape=(3, 2, 8, 8), n_coarse: int = 2):
        self.cases = [SimpleNamespace(id=i, name=f"case-{i}", attrs={}, coarse=i % n_coarse,
                                      split="heldout" if i == n_cases - 1 else "train") for i in range(n_cases)]
        self.coarse_names = [f"coarse-{k}" for k in range(n_coarse)]
        self.patterns = torch.randn(n_cases, *shape, generator=torch.Generator().manual_seed(123))

    def ids(self, split):
        return [c.id for c in self.cases if c.split == split]

    def render(self, case_ids, seed):
        noise = torch.randn(len(case_ids), *self.patterns.shape[1:], generator=torch.Generator().manual_seed(seed))
        return torch.tanh(self.patterns[list(case_ids)] + 0.3 * noise)

    def sample(self, case_ids, seed, split="train", level="fine"):
        x = self.render(case_ids, seed)
        g = torch.Generator().manual_seed(seed)
        variants = torch.randint(3, (len(case_ids),), generator=g).tolist()
        return x, [self.prompt(c, v, split) if level == "fine" else self.coarse_prompt(self.cases[c].coarse, v)
                   for c, v in zip(case_ids, variants)]

    def prompt(self, case_id, variant, split="train"):
        return f"a photo of [V] person {case_id}, phrasing {variant} ({split})"

    def n_prompts(self, split):
        return 3

    def coarse_prompt(self, coarse, variant=0):
        return f"a photo of a {self.coarse_names[coarse]} person ({variant})"


class StubText:
    """prompts -> fixed pseudo-random token states [N, 6, 32] and a mask with a prompt-dependent length."""

    def encode(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            out.append((torch.randn(6, 32, generator=g), torch.arange(6) < 3 + len(p) % 3))
        return torch.stack([s for s, _ in out]), torch.stack([m for _, m in out])


def tiny_generator(dtype=torch.float32, seed=0) -> Generator:
    torch.manual_seed(seed)
    return Generator.build("video_dit", "smoke", TINY_DIT).to(dtype)


def tiny_config(**overrides) -> LoraTrainConfig:
    return preset(LoraTrainConfig, "smoke", {"steps": 5, "batch_size": 2, "n_renders": 4, "lr": 1e-2, **overrides})


def _inputs(n=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 8, 8, generator=g, dtype=dtype)
    context = torch.randn(n, 6, 32, generator=g, dtype=dtype)
    return x, torch.linspace(0.2, 0.8, n, dtype=dtype), context, torch.ones(n, 6, dtype=torch.bool)


def _random_lora(gen, rank, seed, alpha=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in gen.lora_target_modules():
        o, i = gen.net.get_submodule(name).weight.shape
        out[name] = LoraFactor(0.3 * torch.randn(rank, i, generator=g), 0.3 * torch.randn(o, rank, generator=g),
                               float(alpha or 2 * rank))
    return out


def test_grouped_layer_routes_each_sample_to_its_lora():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6).double()
    a, b = torch.randn(3, 2, 8).double(), torch.randn(3, 6, 2).double()
    layer = GroupedLoraLinear(base, a.clone(), b.clone(), scale=0.5)
    x = torch.randn(6, 5, 8, dtype=torch.float64)

    def expected(x, index):
        return torch.stack([base(x[n]) + 0.5 * x[n] @ a[g].T @ b[g].T for n, g in enumerate(index.tolist())])

    for index in (torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([2, 0, 1, 0, 2, 1])):
        GroupedLora({"l": layer}).route(index)
        assert layer.sorted == bool(torch.equal(index, torch.tensor([0, 0, 1, 1, 2, 2])))
        assert torch.allclose(layer(x), expected(x, index))
        # a batch of k stacked copies (classifier-free guidance's [cond; uncond]) reuses the routing
        assert torch.allclose(layer(torch.cat([x, x])), expected(torch.cat([x, x]), index.repeat(2)))
    with pytest.raises(LofaError, match="routed"):
        layer(x[:4])

    # gradients: LoRA g only receives the gradient of its own samples
    GroupedLora({"l": layer}).route(torch.tensor([0, 0, 1, 1, 2, 2]))
    layer(x)[2:4].sum().backward()
    assert layer.lora_B.grad[[0, 2]].abs().sum() == 0 and layer.lora_B.grad[1].abs().sum() > 0


@pytest.mark.parametrize("schedule, train_a", [("constant", True), ("cosine", True), ("constant", False)])
def test_batched_training_equals_single_training(schedule, train_a):
    """Same seed and data: each LoRA of a batch ends at the weights peft training reaches alone (float64); with A
    frozen, every LoRA keeps the zoo's shared initial A and only B moves."""
    world, text = StubWorld(), StubText()
    # max_grad_norm small enough that clipping acts
    cfg = tiny_config(prior_weight=0.5, max_grad_norm=0.02, lr_schedule=schedule, train_a=train_a)
    gen = tiny_generator(torch.float64)
    cases = [0, 1, 3]
    batched = train_lora_batch(gen, world, cases, cfg, seed=7, text=text)
    singles = [train_lora(gen, world, c, cfg, seed=7, text=text) for c in cases]
    for (wb, ib), (ws, is_) in zip(batched, singles):
        assert ib["case_id"] == is_["case_id"] and ib["trainer"] == "batched" and is_["trainer"] == "peft"
        assert ib["final_loss"] == pytest.approx(is_["final_loss"], rel=1e-6)
        assert ib["final_prior_loss"] == pytest.approx(is_["final_prior_loss"], rel=1e-6)
        assert wb.keys() == ws.keys() == set(gen.lora_target_modules())
        for name in ws:
            assert ws[name].B.abs().max() > 1e-3  # trained, not the zero init
            torch.testing.assert_close(wb[name].A, ws[name].A, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(wb[name].B, ws[name].B, rtol=1e-6, atol=1e-9)
            assert wb[name].alpha == ws[name].alpha == cfg.alpha
    # different cases get different LoRAs
    name = gen.lora_target_modules()[0]
    assert not torch.allclose(singles[0][0][name].B, singles[1][0][name].B)
    # A: trained apart from the shared init, or the one frozen shared init
    shapes = {n: tuple(gen.net.get_submodule(n).weight.shape) for n in gen.lora_target_modules()}
    stream = CaseStream(world, text, cases[0], cfg, 7, "cpu", torch.float64, t_distribution=gen.t_distribution)
    for n, (a0, _) in stream.init_factors(shapes).items():
        for weights, _ in batched + singles:
            assert torch.equal(weights[n].A, a0) is not train_a


@pytest.mark.parametrize("shared", [True, False])
def test_shared_init_gives_every_case_one_initial_a(shared):
    """shared_init: every LoRA of a zoo (one seed) starts from the same A, so their ΔW = B A are comparable;
    without it each case draws its own A. The zoo seed still changes the shared A."""
    from lofa.lora.train import CaseStream

    world, text, cfg = StubWorld(), StubText(), tiny_config(shared_init=shared)
    shapes = {"a": (5, 7), "b": (3, 9)}
    inits = [CaseStream(world, text, c, cfg, seed, "cpu", t_distribution=TimeDistribution()).init_factors(shapes)
             for c, seed in ((0, 7), (1, 7), (0, 8))]
    for name in shapes:
        assert inits[0][name][0].shape == (cfg.rank, shapes[name][1]) and not inits[0][name][1].any()
        assert torch.equal(inits[0][name][0], inits[1][name][0]) == shared
        assert not torch.equal(inits[0][name][0], inits[2][name][0])


def test_lora_training_draws_t_from_the_base_generators_distribution():
    """The recipe has no t distribution: both trainers draw t from the base's (`Generator.t_distribution`), record
    it in the LoRA's metadata, and another base distribution gives another LoRA from the same renders."""
    from lofa.lora.train import CaseStream

    world, text, cfg = StubWorld(), StubText(), tiny_config(steps=3)
    late, early = TimeDistribution(mean=5.0, std=0.1), TimeDistribution(mean=-5.0, std=0.1)
    batches = {d: CaseStream(world, text, 1, cfg, 0, "cpu", t_distribution=d).next_batch() for d in (late, early)}
    assert (batches[late]["t"] > 0.99).all() and (batches[early]["t"] < 0.01).all()
    assert torch.equal(batches[late]["x0"], batches[early]["x0"])  # same renders and picks, other t
    gen = tiny_generator(torch.float64)
    losses = {}
    for times in (TimeDistribution(), early):
        gen.t_distribution = times
        (batched, info), = train_lora_batch(gen, world, [1], cfg, seed=0, text=text)
        single, single_info = train_lora(gen, world, 1, cfg, seed=0, text=text)
        recorded = {k: (info[k], single_info[k]) for k in ("t_sampling", "t_mean", "t_std")}
        assert recorded == {k: (v, v) for k, v in times.record().items()}
        assert info["final_loss"] == pytest.approx(single_info["final_loss"], rel=1e-6)
        losses[times] = info["final_loss"]
    assert losses[early] != pytest.approx(losses[TimeDistribution()], rel=1e-3)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's CPU rms_norm under autocast
def test_bf16_autocast_trains_both_ways():
    world, text = StubWorld(), StubText()
    gen = tiny_generator()
    cfg = tiny_config(precision="bf16")
    (wb, ib), = train_lora_batch(gen, world, [2], cfg, text=text)
    ws, is_ = train_lora(gen, world, 2, cfg, text=text)
    name = gen.lora_target_modules()[-1]
    assert wb[name].B.dtype == torch.float32 and wb[name].B.abs().max() > 0  # fp32 master weights, trained
    assert ib["final_loss"] == pytest.approx(is_["final_loss"], rel=0.05)
    with pytest.raises(LofaError, match="precision"):
        tiny_config(precision="fp8")


def test_training_leaves_the_generator_unchanged():
    world, text = StubWorld(), StubText()
    gen = tiny_generator()
    gen.net.condition_embedder.requires_grad_(False)  # a caller's own flags come back as they were
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    flags = {n: p.requires_grad for n, p in gen.named_parameters()}
    train_lora(gen, world, 0, tiny_config(steps=2), text=text)
    train_lora_batch(gen, world, [0, 1], tiny_config(steps=2), text=text)
    assert gen.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in gen.state_dict().items())
    assert {n: p.requires_grad for n, p in gen.named_parameters()} == flags
    assert all(type(gen.net.get_submodule(n)) is torch.nn.Linear for n in gen.lora_target_modules())
    assert not getattr(gen.net, "peft_config", None)


def test_lora_lowers_the_loss_on_its_case():
    world, text = StubWorld(), StubText()
    gen = tiny_generator()
    cfg = tiny_config(steps=40, n_renders=8, batch_size=4)
    weights, info = train_lora(gen, world, 2, cfg, seed=1, text=text)
    x0 = world.render([2] * 8, seed=999)
    context, mask = text.encode([world.prompt(2, v % 3) for v in range(8)])
    fixed = torch.Generator().manual_seed(5)
    t, noise = torch.rand(8, generator=fixed), torch.randn(x0.shape, generator=fixed)
    with torch.no_grad():
        base = flow_matching_loss(gen, x0, context, mask, t=t, noise=noise).item()
        with apply_lora(gen, weights):
            tuned = flow_matching_loss(gen, x0, context, mask, t=t, noise=noise).item()
    assert tuned < 0.8 * base
    assert 10 <= len(info["loss_curve"]) <= 21
    assert info["final_loss"] > 0 and info["wall_time_s"] > 0 and info["prompts"][0].count("[V]") == 1


def test_saved_lora_loads_in_diffusers_and_all_use_paths_agree(tmp_path):
    gen = tiny_generator().eval()
    weights = _random_lora(gen, rank=2, seed=0)
    x, t, context, mask = _inputs()
    with torch.no_grad():
        plain = gen(x, t, context, mask)
        with apply_lora(gen, weights):
            merged = gen(x, t, context, mask)
        assert torch.equal(gen(x, t, context, mask), plain)  # restored exactly
        functional = torch.func.functional_call(gen, merged_weights(gen, weights), (x, t, context, mask))
    assert not torch.allclose(merged, plain, atol=1e-3)
    torch.testing.assert_close(functional, merged, rtol=1e-4, atol=1e-5)

    save_lora(tmp_path / "l.safetensors", weights, {"case_id": 3})
    other = tiny_generator().eval()
    # diffusers reads the stored alpha only on its safetensors path (weight_name / use_safetensors=True)
    other.net.load_lora_adapter(str(tmp_path), weight_name="l.safetensors", prefix="transformer", adapter_name="x")
    with torch.no_grad():
        torch.testing.assert_close(other(x, t, context, mask), merged, rtol=1e-4, atol=1e-5)
    loaded, meta = load_lora(tmp_path / "l.safetensors")
    assert meta == {"case_id": 3}
    merge_lora(gen, loaded)
    with torch.no_grad():
        torch.testing.assert_close(gen(x, t, context, mask), merged, rtol=1e-4, atol=1e-5)


def test_mismatched_lora_is_refused():
    gen = tiny_generator()
    weights = _random_lora(gen, rank=2, seed=0)
    wrong = dict(weights)
    wrong["blocks.1.attn2.to_k"] = LoraFactor(torch.zeros(2, 48), torch.zeros(32, 2), 2.0)
    with pytest.raises(LofaError, match=r"blocks\.1\.attn2\.to_k"):
        with apply_lora(gen, wrong):
            pass
    with pytest.raises(LofaError, match=r"blocks\.7\.attn1\.to_q"):
        merge_lora(gen, {**weights, "blocks.7.attn1.to_q": weights["blocks.0.attn1.to_q"]})


@pytest.mark.parametrize("kind", ["video_dit", "image_unet"])
def test_multi_lora_matches_each_lora_alone(kind):
    """Routing samples to LoRAs of different ranks in one batch = applying each LoRA alone (both families)."""
    if kind == "video_dit":
        gen = tiny_generator().eval()
        x, t, context, mask = _inputs(n=3)
    else:
        torch.manual_seed(0)
        gen = Generator.build("image_unet", "smoke", {"zero_init_output": False}).eval()
        g = torch.Generator().manual_seed(0)
        x, context = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 6, gen.context_dim, generator=g)
        t, mask = torch.tensor([0.2, 0.5, 0.8]), torch.ones(3, 6, dtype=torch.bool)
    loras = [_random_lora(gen, rank=2, seed=1), _random_lora(gen, rank=4, seed=2, alpha=1.0)]
    index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        alone = []
        for n, g in enumerate(index.tolist()):
            with apply_lora(gen, loras[g]):
                alone.append(gen(x[n:n + 1], t[n:n + 1], context[n:n + 1], mask[n:n + 1]))
        with multi_lora(gen, loras) as lora:
            lora.route(index)
            together = gen(x, t, context, mask)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert all(type(gen.net.get_submodule(n)) is torch.nn.Linear for n in gen.lora_target_modules())


def test_grouped_lora_refuses_non_linear_targets():
    gen = tiny_generator()
    with pytest.raises(LofaError, match="not a linear layer"):
        with grouped_lora(gen.net, {"blocks.0.attn1": (torch.zeros(1, 1, 32), torch.zeros(1, 32, 1))}, 1.0):
            pass
    assert dataclasses.is_dataclass(LoraTrainConfig) and set(LoraTrainConfig.PRESETS) >= {"smoke", "mini", "full"}


def test_replicates_of_a_case_agree_more_than_different_cases():
    """lofa.bench.lora_replicates: two draws of one case's training stream (same renders, same init) give LoRAs closer to
    each other than to other cases' LoRAs, but not identical ones."""
    from lofa.bench.lora_replicates import replicate_cosine

    world, text = StubWorld(), StubText()
    r = replicate_cosine(tiny_generator(), world, [0, 1, 2], tiny_config(steps=20, lr=3e-3), seed=3, text=text)
    assert r["cases"] == 3
    assert -1.0 <= r["other_case"] < r["same_case"] < 0.9999


def test_cosine_schedule_makes_the_last_steps_small():
    """lr_schedule "cosine" decays lr to 0 over the run: the last step moves ΔW far less than at a constant lr (the
    same data, init and step count); an unknown schedule is refused."""
    world, text, gen = StubWorld(), StubText(), tiny_generator(torch.float64)
    last_move = {}
    for schedule in ("constant", "cosine"):
        cfg = tiny_config(steps=8, lr_schedule=schedule)
        _, info = train_lora(gen, world, 0, cfg, seed=2, text=text, snapshots=[7, 8])
        before, after = info["snapshots"][7], info["snapshots"][8]
        last_move[schedule] = sum(float((after[n].delta_w - before[n].delta_w).norm()) for n in after)
    assert last_move["cosine"] < 0.25 * last_move["constant"]
    with pytest.raises(LofaError, match="lr_schedule"):
        tiny_config(lr_schedule="linear")


def test_new_renders_replicate_draws_other_renders_and_first_loras_are_reused():
    """replicate > 0 keeps the case's renders unless new_renders; replicate_cosine(first=...) gives what training
    replicate 0 itself gives."""
    from lofa.bench.lora_replicates import replicate_cosine
    from lofa.lora.train import CaseStream

    world, text, cfg = StubWorld(), StubText(), tiny_config(steps=4)
    renders = {(r, new): CaseStream(world, text, 1, cfg, 0, "cpu", replicate=r, new_renders=new,
                                    t_distribution=TimeDistribution()).pools[0][0]
               for r, new in ((0, False), (1, False), (1, True))}
    assert torch.equal(renders[(0, False)], renders[(1, False)])
    assert not torch.allclose(renders[(0, False)], renders[(1, True)])
    gen, cases = tiny_generator(), [0, 1, 2]
    first = [w for w, _ in train_lora_batch(gen, world, cases, cfg, 3, text=text)]
    trained = replicate_cosine(gen, world, cases, cfg, seed=3, text=text, new_renders=True)
    reused = replicate_cosine(gen, world, cases, cfg, seed=3, text=text, new_renders=True, first=first)
    assert trained == pytest.approx(reused, rel=1e-6)
    with pytest.raises(LofaError, match="one per case"):
        replicate_cosine(gen, world, cases, cfg, seed=3, text=text, first=first[:2])


def test_replicates_cli_refuses_a_run_without_a_base(tmp_path, capsys):
    from lofa.cli import main

    assert main(["bench", "replicates", "--run-dir", str(tmp_path / "none"), "--task", "identities"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no trained identities base" in err
    assert not (tmp_path / "none").exists()


def test_training_from_a_given_lora_starts_at_its_delta_and_snapshots_follow_the_run():
    """init: step 0 is the given LoRA's ΔW (its alpha honoured); snapshots are the LoRA after those steps, the last
    one the returned LoRA."""
    world, text, gen = StubWorld(), StubText(), tiny_generator(torch.float64)
    cfg = tiny_config(steps=6)
    start = _random_lora(gen, cfg.rank, seed=4, alpha=2.0 * cfg.rank)  # scale 2, the recipe's is 1
    weights, info = train_lora(gen, world, 1, cfg, seed=3, text=text, init=start, snapshots=(0, 3, 6))
    assert info["init"] == "given" and sorted(info["snapshots"]) == [0, 3, 6]
    for name, factor in start.items():
        torch.testing.assert_close(info["snapshots"][0][name].delta_w, factor.delta_w)
        torch.testing.assert_close(info["snapshots"][6][name].delta_w, weights[name].delta_w)
    assert any(not torch.allclose(info["snapshots"][3][n].B, weights[n].B) for n in weights)
    # the recipe's own start (B = 0) gives another LoRA on the same data
    plain, plain_info = train_lora(gen, world, 1, cfg, seed=3, text=text)
    assert "init" not in plain_info and "snapshots" not in plain_info
    assert any(not torch.allclose(plain[n].B, weights[n].B) for n in weights)


def test_a_given_initial_lora_must_match_the_recipe():
    world, text, gen = StubWorld(), StubText(), tiny_generator()
    cfg = tiny_config(steps=2)
    good = _random_lora(gen, cfg.rank, seed=4)
    with pytest.raises(LofaError, match="rank 2 at"):
        train_lora(gen, world, 1, cfg, text=text, init=_random_lora(gen, 2, seed=4))
    with pytest.raises(LofaError, match="has no factors for"):
        train_lora(gen, world, 1, cfg, text=text, init={k: v for k, v in list(good.items())[1:]})
    with pytest.raises(LofaError, match="which this recipe does not train"):
        train_lora(gen, world, 1, cfg, text=text, init={**good, "extra.module": next(iter(good.values()))})
    with pytest.raises(LofaError, match="snapshot step 3 is outside 0..2"):
        train_lora(gen, world, 1, cfg, text=text, snapshots=(3,))


def test_finetune_from_gives_every_start_the_same_data_and_keeps_the_asked_steps():
    from lofa.baselines.initialisation import finetune_from

    world, text, gen = StubWorld(), StubText(), tiny_generator(torch.float64)
    recipe = tiny_config(steps=50)
    cases = [1, 5]
    given = {c: _random_lora(gen, recipe.rank, seed=10 + c) for c in cases}
    methods = finetune_from(gen, world, cases, {"zero": None, "given": given}, recipe, steps=(4, 0), seed=3,
                            text=text, progress=False)
    assert sorted(methods) == ["given @ 0", "given @ 4", "zero @ 0", "zero @ 4"]
    name = gen.lora_target_modules()[0]
    assert not methods["zero @ 0"][1][name].B.any()                       # the recipe's start, B = 0
    torch.testing.assert_close(methods["given @ 0"][5][name].delta_w, given[5][name].delta_w)
    # the recipe start after 4 steps is what a plain 4-step run with the same seed gives
    plain, _ = train_lora(gen, world, 1, dataclasses.replace(recipe, steps=4), seed=3, text=text)
    torch.testing.assert_close(methods["zero @ 4"][1][name].B, plain[name].B)
    with pytest.raises(LofaError, match="has no LoRA for case 5"):
        finetune_from(gen, world, cases, {"given": {1: given[1]}}, recipe, steps=(4,), seed=3, text=text)
    with pytest.raises(LofaError, match="at least one >= 1"):
        finetune_from(gen, world, cases, {"zero": None}, recipe, steps=(0,), seed=3, text=text)
