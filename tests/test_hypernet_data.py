"""Training triplets for the hypernetwork from a zoo, and the Stage II diffusion term through the frozen base
(a smoke world, a smoke generator and a zoo of random LoRAs written as real LoRA files; tiny CPU sizes)."""
from dataclasses import asdict

import numpy as np
import pytest
import torch

from lofa.errors import LofaError
from lofa.hypernet import HyperConfig, Stage1, Stage2
from lofa.hypernet.data import DiffusionLoss, TripletConfig, Triplets, build_conditions, view_seed
from lofa.hypernet.train import Stage2Objective, TrainConfig
from lofa.io import write_json
from lofa.lora.formats import LoraFactor, save_lora
from lofa.lora.train import LoraTrainConfig
from lofa.lora.zoo import INDEX, Zoo, lora_filename
from lofa.models.cond_encoders import encoder_for_world
from lofa.models.generator import Generator
from lofa.worlds import make_world

RANK = 2
CFG = TripletConfig(views=2, clips_per_case=2, clips_per_step=1)


class StubText:
    """A deterministic stand-in for MiniLM: token states from a hash of each word, mask over the words."""

    dim = 8

    def encode(self, prompts, max_length=12):
        states = torch.zeros(len(prompts), max_length, self.dim)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            for j, word in enumerate(p.split()[:max_length]):
                g = torch.Generator().manual_seed(sum(map(ord, word)) * 31 + len(word))
                states[i, j] = torch.randn(self.dim, generator=g)
                mask[i, j] = True
        return states, mask


def random_factor(case, name, shape, g):
    out_f, in_f = shape
    return LoraFactor(torch.randn(RANK, in_f, generator=g) * 0.3, torch.randn(out_f, RANK, generator=g) * 0.05,
                      float(RANK))


def fake_zoo(path, world, gen, seed=0, include_ffn=False, factor=random_factor):
    """A zoo folder in the real layout (index.json + diffusers LoRA files) holding a LoRA of every case:
    factor(case, module name, (out, in), generator) -> LoraFactor (default random) for each target (FFN ones too
    with include_ffn)."""
    cfg = LoraTrainConfig(rank=RANK, alpha=float(RANK), include_ffn=include_ffn)
    names = gen.lora_target_modules(include_ffn)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for case in world.cases:
        weights = {}
        for n in names:
            weights[n] = factor(case, n, tuple(gen.net.get_submodule(n).weight.shape), g)
        meta = {"case_id": case.id, "split": case.split, "task": world.task, "seed": seed, "base": "stub",
                "wall_time_s": 1.0, **asdict(cfg)}
        save_lora(path / "loras" / lora_filename(case.id), weights, meta)
        entries.append({**meta, "file": f"loras/{lora_filename(case.id)}"})
    write_json(path / INDEX, {"task": world.task, "seed": seed, "config": asdict(cfg), "base": "stub",
                              "loras": entries})
    return Zoo(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    world = make_world("actions", "smoke")
    # a fresh generator with a non-zero output layer, so gradients flow through it as through a trained one
    gen = Generator.build("video_dit", "smoke", {"text_dim": StubText.dim, "zero_init_output": False}).eval()
    zoo = fake_zoo(tmp_path_factory.mktemp("zoo"), world, gen)
    data = Triplets(world, zoo, gen, "text", CFG, text=StubText(), seed=3)
    return world, gen, zoo, data


def test_triplets_hold_the_zoo_loras_and_the_base_weights(setup):
    world, gen, zoo, data = setup
    assert data.train_ids == world.ids("train") and data.heldout_ids == world.ids("heldout")
    assert data.spec.names == gen.lora_target_modules() and data.rank == RANK and data.alpha_value == RANK
    case = data.heldout_ids[0]
    lora, _ = zoo.load(case)
    batch = data.batch([data.train_ids[1], case])
    for t, name in enumerate(data.spec.names):
        torch.testing.assert_close(data.base[t], gen.net.get_submodule(name).weight.detach())
        A, B, alpha = batch.loras[name]
        torch.testing.assert_close(A[1], lora[name].A)
        torch.testing.assert_close(B[1], lora[name].B)
        assert torch.equal(alpha, torch.full((2,), float(RANK)))
    assert batch.extra["case_ids"].tolist() == [data.train_ids[1], case]


def test_batch_fn_is_pure_in_the_step_and_never_draws_heldout_cases(setup):
    _, _, _, data = setup
    fn = data.batch_fn(batch_size=4, matrices=3)
    a, b, c = fn(7, 0), data.batch_fn(batch_size=4, matrices=3)(7, 0), fn(8, 0)
    assert torch.equal(a.cond, b.cond) and torch.equal(a.cond_mask, b.cond_mask)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.extra["case_ids"], b.extra["case_ids"])
    assert all(torch.equal(a.loras[k][0], b.loras[k][0]) for k in a.loras)
    assert not (torch.equal(a.extra["case_ids"], c.extra["case_ids"]) and torch.equal(a.targets, c.targets))
    assert not torch.equal(a.extra["case_ids"], fn(7, 1).extra["case_ids"])  # another process, another batch
    assert len(a.targets) == 3 and set(a.loras) == {data.spec.names[t] for t in a.targets.tolist()}
    seen = set()
    for step in range(60):
        ids = fn(step, 0).extra["case_ids"].tolist()
        assert len(set(ids)) == 4
        seen |= set(ids)
    assert seen <= set(data.train_ids) and not seen & set(data.heldout_ids)
    assert len(seen) == len(data.train_ids)  # every train case gets its turn
    stage2 = data.batch_fn(batch_size=2)(0, 0)
    assert torch.equal(stage2.targets, torch.arange(len(data.spec)))


def test_text_conditions_train_and_reserved_eval_phrasings(setup):
    world, _, _, data = setup
    train, held = data.conditions("train"), data.conditions("eval")
    C = len(data.train_ids) + len(data.heldout_ids)
    assert train.tokens.shape[:2] == (C, world.n_prompts("train")) and held.views == world.n_prompts("eval")
    assert train.mask.shape == train.tokens.shape[:3] and train.dim == StubText.dim
    # key-padding mask: a prefix of real tokens, zero states behind it; length = the longest prompt
    case = data.heldout_ids[0]
    tokens, mask = train.get([case, case], [0, 1])
    n_words = [min(12, len(world.prompt(case, v, "train").split())) for v in (0, 1)]
    assert mask.sum(1).tolist() == n_words and (tokens[~mask] == 0).all()
    assert train.mask.any((0, 1)).all() and train.mask.any((0, 1))[-1]
    # the eval phrasing is not one of the train phrasings
    eval_tokens, _ = held.get([case])
    assert all(not torch.equal(eval_tokens[0], train.get([case], [v])[0][0][: eval_tokens.shape[1]])
               for v in range(train.views))
    with pytest.raises(LofaError, match="no condition for case"):
        build_conditions(world, "text", [0], text=StubText()).get([1])


def test_pose_and_image_conditions_come_from_the_encoder():
    actions, styles = make_world("actions", "smoke"), make_world("styles", "smoke")
    torch.manual_seed(0)
    pose_enc, image_enc = encoder_for_world(actions, "smoke").eval(), encoder_for_world(styles, "smoke").eval()
    pose = build_conditions(actions, "pose", [0, 3], views=3, encoder=pose_enc)
    assert pose.views == 1  # the canonical pose sequence does not depend on the seed
    with torch.no_grad():
        expected, _ = pose_enc.encode(actions.condition([3], seed=0))
    torch.testing.assert_close(pose.get([3])[0], expected)
    image = build_conditions(styles, "image", [0, 3], views=3, encoder=image_enc)
    K, D = image_enc.config.num_tokens, image_enc.config.dim
    assert image.tokens.shape == (2, 3, K, D) and image.mask.all()
    assert not torch.equal(image.tokens[:, 0], image.tokens[:, 1])  # a reference image per seed
    held = build_conditions(styles, "image", [0, 3], "eval", views=3, encoder=image_enc)
    assert not any(torch.equal(held.tokens[:, 0], image.tokens[:, v]) for v in range(3))  # disjoint seeds
    # what a figure shows as the condition of a view is what that view encodes
    with torch.no_grad():
        shown, _ = image_enc.encode(styles.condition([0, 3], seed=view_seed(0, "eval", 2)))
    torch.testing.assert_close(held.tokens[:, 2], shown)


def test_condition_inputs_are_what_the_predictions_read(setup):
    world, _, _, data = setup
    case = data.heldout_ids[0]
    assert data.condition_inputs([case]) == [world.prompt(case, 0, "eval")]  # view 0 of the reserved phrasings
    assert data.condition_inputs([case], "train", view=1) == [world.prompt(case, 1, "train")]


def test_diffusion_loss_reaches_the_predicted_factors_not_the_base(setup):
    world, gen, _, data = setup
    loss_fn = DiffusionLoss(gen, world, StubText(), CFG, seed=1)
    batch = data.batch(data.train_ids[:2], step=5)
    pred = {n: (A.clone().requires_grad_(True), B.clone().requires_grad_(True), alpha)
            for n, (A, B, alpha) in batch.loras.items()}
    loss = loss_fn(pred, batch)
    loss.backward()
    assert torch.isfinite(loss) and loss.ndim == 0
    assert all(A.grad is not None and A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0 for A, B, _ in pred.values())
    assert all(p.grad is None for p in gen.parameters())
    assert loss_fn(pred, batch).item() == pytest.approx(loss.item())  # pure in the step
    # the LoRA is really applied: a zero LoRA gives the plain generator's loss, and the given one changes it
    zero = {n: (torch.zeros_like(A), B, alpha) for n, (A, B, alpha) in pred.items()}
    plain = loss_fn(zero, batch).item()
    assert plain != pytest.approx(loss.item(), rel=1e-4)
    assert loss_fn(pred, data.batch(data.train_ids[:2], step=6)).item() != pytest.approx(loss.item(), rel=1e-6)


def test_diffusion_loss_draws_t_from_the_base_generators_distribution(setup):
    """Stage II's diffusion term draws t from the base's own distribution (`Generator.t_distribution`)."""
    from lofa.diffusion import TimeDistribution

    world, gen, _, data = setup
    batch = data.batch(data.train_ids[:2], step=5)
    drawn = []

    def record_t(module, args):  # gen(x_t, t [k], context, mask), once per case
        drawn.append(args[1])

    hook = gen.register_forward_pre_hook(record_t)
    own = gen.t_distribution
    try:
        for times in (TimeDistribution(mean=5.0, std=0.1), TimeDistribution(mean=-5.0, std=0.1)):
            gen.t_distribution = times
            DiffusionLoss(gen, world, StubText(), CFG, seed=1)(batch.loras, batch)
    finally:
        hook.remove()
        gen.t_distribution = own
    late, early = torch.cat(drawn[:len(drawn) // 2]), torch.cat(drawn[len(drawn) // 2:])
    assert len(drawn) == 4 and (late > 0.99).all() and (early < 0.01).all()


def test_stage2_diffusion_term_trains_the_hypernetwork(setup):
    world, gen, _, data = setup
    cfg = HyperConfig(d_model=32, n_heads=2, depth=2, patch=16, rank=RANK, alpha=float(RANK), cond_dim=data.cond_dim,
                      map_rank=4)
    torch.manual_seed(0)
    stage1 = Stage1(cfg, data.spec)
    stage2 = Stage2.from_stage1(stage1)
    objective = Stage2Objective(data.base, TrainConfig(lambda_recon=0.0, lambda_diff=1.0), stage1,
                                DiffusionLoss(gen, world, StubText(), CFG))
    loss, metrics = objective(stage2, data.batch_fn(batch_size=2)(0, 0))
    loss.backward()
    assert metrics["diffusion"] == pytest.approx(loss.item())
    grad = stage2.lora_head.b.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the B head (zero at init) learns from the diffusion term
    assert all(p.grad is None for p in stage1.parameters()) and all(p.grad is None for p in gen.parameters())


def test_response_maps_of_loras_and_of_stage1(setup):
    from lofa.analysis import response_map
    from lofa.hypernet.data import lora_maps, stack_loras, stage1_maps

    world, gen, zoo, data = setup
    ids = data.heldout_ids[:2]
    batch = data.batch(ids)
    maps, valid = lora_maps(data.base, batch.loras)
    M = len(data.spec)
    assert maps.shape == valid.shape == (2, M, 64, 64) and valid.all()  # smoke DiT: every target is 64 x 64
    stacked = stack_loras([zoo.load(c)[0] for c in ids])
    assert torch.equal(lora_maps(data.base, stacked)[0], maps)
    for t, name in enumerate(data.spec.names):
        f = zoo.load(ids[1])[0][name]
        assert torch.equal(maps[1, t], response_map(f.delta_w, data.base[t], 0.02))
    assert 0 < maps.float().mean() < 1
    cfg = HyperConfig(d_model=32, n_heads=2, depth=1, patch=16, rank=RANK, alpha=float(RANK), cond_dim=data.cond_dim,
                      map_rank=4)
    torch.manual_seed(0)
    stage1 = Stage1(cfg, data.spec).eval()
    pred = stage1_maps(stage1, data, ids)
    assert pred.shape == maps.shape and pred.dtype == torch.bool
    # calibration: the map density of the train LoRAs is what lora_maps count, and deciding at a high prior
    # adds responding entries to the logit-0 map, never removes any
    density = data.map_density()
    train_maps, _ = lora_maps(data.base, data.batch(data.train_ids).loras)
    assert density == pytest.approx(float(train_maps.float().mean()))
    stage1.set_map_density(0.99)
    calibrated, raw = stage1_maps(stage1, data, ids), stage1_maps(stage1, data, ids, calibrated=False)
    assert torch.equal(raw, pred) and (calibrated | ~raw).all() and calibrated.sum() > raw.sum()


def test_learning_curve_cases_and_fidelity_of_any_loras(setup):
    from lofa.hypernet.data import delta_fidelity_per_case
    from lofa.lora.formats import LoraFactor

    _, _, zoo, data = setup
    cases = data.monitor_cases(3)
    assert set(cases) == {"heldout", "train"} and len(cases["train"]) == min(3, len(data.train_ids))
    assert set(cases["heldout"]) <= set(data.heldout_ids) and cases["train"] == sorted(set(cases["train"]))
    assert cases["train"][0] == min(data.train_ids) and cases["train"][-1] == max(data.train_ids)
    batches = data.monitor_batches(3, chunk=2)
    assert [c for b in batches["train"] for c in b.extra["case_ids"].tolist()] == cases["train"]
    ids = cases["heldout"]
    own = [zoo.load(c)[0] for c in ids]
    cosine, magnitude = delta_fidelity_per_case(data, ids, own)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-4)
    np.testing.assert_allclose(magnitude, 1.0, rtol=1e-4)
    half = [{n: LoraFactor(f.A, -f.B / 2, f.alpha) for n, f in lora.items()} for lora in own]
    cosine, magnitude = delta_fidelity_per_case(data, ids, half)
    np.testing.assert_allclose(cosine, -1.0, rtol=1e-4)
    np.testing.assert_allclose(magnitude, 0.5, rtol=1e-4)


def test_delta_l1_per_case_is_zero_for_the_zoo_lora_and_grows_with_the_error(setup):
    from lofa.hypernet.data import delta_l1_per_case
    from lofa.lora.formats import LoraFactor

    _, _, zoo, data = setup
    ids = data.heldout_ids[:2]
    own = [zoo.load(c)[0] for c in ids]
    assert np.allclose(delta_l1_per_case(data, ids, own), 0.0, atol=1e-7)
    zero = [{n: LoraFactor(f.A, torch.zeros_like(f.B), f.alpha) for n, f in lora.items()} for lora in own]
    swapped = delta_l1_per_case(data, ids, own[::-1])
    l1_zero = delta_l1_per_case(data, ids, zero)
    assert (l1_zero > 0).all() and (swapped > 0).all()
    half = [{n: LoraFactor(f.A, f.B / 2, f.alpha) for n, f in lora.items()} for lora in own]
    np.testing.assert_allclose(delta_l1_per_case(data, ids, half), l1_zero / 2, rtol=1e-4)


def test_mean_factors_are_the_train_loras_means_and_a_shared_a_makes_them_the_mean_lora(setup, tmp_path):
    world, gen, zoo, data = setup
    start = data.mean_factors()
    assert sorted(start) == list(range(len(data.spec)))
    name = data.spec.names[0]
    loras = [zoo.load(c)[0][name] for c in data.train_ids]  # held-out LoRAs never enter the start
    torch.testing.assert_close(start[0][0], torch.stack([f.A for f in loras]).mean(0))
    torch.testing.assert_close(start[0][1], torch.stack([f.B for f in loras]).mean(0))
    assert data.mean_factors_error() > 0.5  # random, unrelated A: the factor means are far from the mean ΔW
    # a zoo whose LoRAs share one A (LoraTrainConfig.shared_init, before A moves): the product of the means is the
    # mean LoRA exactly
    shared = fake_zoo(tmp_path / "shared", world, gen)
    first = {n: f.A for n, f in shared.load(shared.case_ids()[0])[0].items()}
    for entry in shared:
        weights, meta = shared.load(entry["case_id"])
        save_lora(shared.dir / entry["file"], {n: LoraFactor(first[n], f.B, f.alpha) for n, f in weights.items()},
                  meta)
    same_a = Triplets(world, Zoo(shared.dir), gen, "text", CFG, text=StubText(), seed=3)
    assert same_a.mean_factors_error() < 1e-5


def test_a_stage2_started_at_the_mean_factors_predicts_the_mean_lora(setup):
    world, gen, zoo, data = setup
    cfg = HyperConfig(d_model=16, n_heads=2, depth=2, patch=8, rank=RANK, alpha=float(RANK), cond_dim=StubText.dim,
                      cond_len=12, map_rank=4)
    stage1 = Stage1(cfg, data.spec)
    stage2 = Stage2.from_stage1(stage1)
    stage2.lora_head.set_start(data.mean_factors())
    batch = data.batch(data.heldout_ids[:2], split="eval")
    f = stage1(data.base, batch.targets, batch.cond, batch.cond_mask, decode_map=False).features
    lora = stage2.lora(stage2(data.base, batch.targets, batch.cond, batch.cond_mask, f), batch.targets)
    for t, name in enumerate(data.spec.names):
        A, B, _ = lora[name]
        torch.testing.assert_close(B[0] @ A[0], data.mean_factors()[t][1] @ data.mean_factors()[t][0])


def test_sparsity_tau_leaves_the_asked_share_of_entries_below_it(setup):
    from lofa.analysis import relative_change
    from lofa.errors import LofaError

    world, gen, zoo, data = setup
    changes = torch.cat([relative_change(zoo.load(c)[0][name].delta_w, data.base[t]).flatten()
                         for c in data.train_ids for t, name in enumerate(data.spec.names)])
    for below in (0.3, 0.65, 0.9):
        tau = data.sparsity_tau(below)
        assert 1 - data.map_density(tau) == pytest.approx(below, abs=0.005)
        exact = float(torch.quantile(changes[torch.randperm(len(changes))[:1_000_000]], below))
        assert tau == pytest.approx(exact, rel=0.02)  # the histogram's bins are 0.5 % wide
    assert data.sparsity_tau(0.3) < data.sparsity_tau(0.9)
    for bad in (0, 1, 1.5):
        with pytest.raises(LofaError, match=r"in \(0, 1\)"):
            data.sparsity_tau(bad)


def test_stage1_is_scored_against_the_maps_at_its_own_tau(setup):
    from dataclasses import replace

    from lofa.hypernet.data import lora_maps
    from lofa.hypernet.fidelity import stage1_heldout_maps

    world, gen, zoo, data = setup
    cfg = HyperConfig(d_model=32, n_heads=2, depth=1, patch=16, rank=RANK, alpha=float(RANK), cond_dim=data.cond_dim,
                      map_rank=4)
    torch.manual_seed(0)
    densities = {}
    for tau in (0.02, data.sparsity_tau(0.8)):
        per_case, _ = stage1_heldout_maps({"s": Stage1(replace(cfg, tau=tau), data.spec).eval()}, {"s": data})
        truth, _ = lora_maps(data.base, data.batch(data.heldout_ids).loras, tau)
        densities[tau] = per_case[per_case.predictor == "Stage I"].density.mean()
        assert densities[tau] == pytest.approx(float(truth.float().mean()), abs=1e-6)
    low, high = sorted(densities)
    assert densities[low] > densities[high] + 0.3  # a sparser τ: far fewer responding entries in the truth
