import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lofa.diffusion import sample
from lofa.errors import LofaError
from lofa.evaluate import (METRICS, GenerateConfig, case_means, denoising_loss, eval_plan, generate, paired_difference,
                           preference, ratio_of_means, score_cases, summarize)
from lofa.lora.formats import LoraFactor
from lofa.lora.train import apply_lora
from lofa.lora.zoo import select_cases
from test_lora_train import StubText, StubWorld, tiny_generator

pytestmark = pytest.mark.usefixtures("one_thread")


class World(StubWorld):
    shape = (3, 2, 8, 8)


def _lora(gen, seed, zero=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in gen.lora_target_modules():
        o, i = gen.net.get_submodule(name).weight.shape
        b = torch.zeros(o, 2) if zero else 0.3 * torch.randn(o, 2, generator=g)
        out[name] = LoraFactor(0.3 * torch.randn(2, i, generator=g), b, 4.0)
    return out


CFG = GenerateConfig(steps=3, guidance_scale=2.0, batch=4)


def test_eval_plan_pairs_cases_prompts_and_seeds():
    world = World()
    ids, prompts, seeds = eval_plan(world, [4, 1], per_case=4, seed=100)
    assert ids == [4, 4, 4, 4, 1, 1, 1, 1]
    # phrasings cycle through the split's variants, one distinct noise seed per sample
    assert prompts[:4] == [world.prompt(4, k % 3) for k in range(4)] and prompts[4] == world.prompt(1, 0)
    assert seeds == list(range(100, 108))
    with pytest.raises(LofaError, match="per_case"):
        eval_plan(world, [1], per_case=0, seed=0)


def test_generate_base_matches_sampler_and_ignores_batching():
    world, text, gen = World(), StubText(), tiny_generator().eval()
    ids, prompts, seeds = eval_plan(world, [0, 2, 5], per_case=2, seed=3)
    x = generate(gen, world, ids, None, prompts, seeds, cfg=CFG, text=text, progress=False)
    assert x.shape == (6, *world.shape) and x.abs().max() <= 1
    # sample i depends on its own seed only: another batch size gives the same samples
    again = generate(gen, world, ids, None, prompts, seeds, cfg=GenerateConfig(steps=3, guidance_scale=2.0, batch=5),
                     text=text, progress=False)
    torch.testing.assert_close(x, again)
    # and it is the shared sampler's output from that seed's noise
    context, mask = text.encode(prompts[3:4])
    uncond, uncond_mask = text.encode([""])
    noise = torch.randn(world.shape, generator=torch.Generator().manual_seed(seeds[3]))[None]
    one = sample(gen, context, mask, noise.shape, steps=3, guidance_scale=2.0, uncond_context=uncond,
                 uncond_mask=uncond_mask, noise=noise)
    torch.testing.assert_close(x[3:4], one, rtol=1e-4, atol=1e-5)


def test_generate_routes_each_sample_to_its_lora():
    """Many LoRAs in one sampler batch (with guidance) = each LoRA merged into the base alone."""
    world, text, gen = World(), StubText(), tiny_generator().eval()
    loras = {0: _lora(gen, 1), 2: _lora(gen, 2), 5: _lora(gen, 3, zero=True)}
    ids, prompts, seeds = eval_plan(world, [0, 2, 5], per_case=2, seed=3)
    x = generate(gen, world, ids, [loras[c] for c in ids], prompts, seeds, cfg=CFG, text=text, progress=False)
    base = generate(gen, world, ids, None, prompts, seeds, cfg=CFG, text=text, progress=False)
    for case in (0, 2):
        rows = [i for i, c in enumerate(ids) if c == case]
        with apply_lora(gen, loras[case]):
            alone = generate(gen, world, [case] * 2, None, [prompts[i] for i in rows], [seeds[i] for i in rows],
                             cfg=CFG, text=text, progress=False)
        torch.testing.assert_close(x[rows], alone, rtol=1e-4, atol=1e-4)
        assert (x[rows] - base[rows]).abs().max() > 1e-3  # the LoRA changed the samples
    torch.testing.assert_close(x[4:], base[4:], rtol=1e-4, atol=1e-5)  # a zero LoRA (B = 0) changes nothing
    assert all(type(gen.net.get_submodule(n)) is torch.nn.Linear for n in gen.lora_target_modules())
    with pytest.raises(LofaError, match="one of each per sample"):
        generate(gen, world, ids, [loras[0]], prompts, seeds, cfg=CFG, text=text, progress=False)


def test_denoising_loss_is_paired_and_routes_loras():
    world, text, gen = World(), StubText(), tiny_generator().eval()
    loras = {0: _lora(gen, 1), 2: _lora(gen, 3, zero=True)}
    ids, prompts, _ = eval_plan(world, [0, 2], per_case=2, seed=0)
    base = denoising_loss(gen, world, ids, None, prompts, seed=5, text=text)
    assert base.shape == (4,) and (base > 0).all()
    np.testing.assert_allclose(base, denoising_loss(gen, world, ids, None, prompts, seed=5, text=text, batch=3))
    assert not np.allclose(base, denoising_loss(gen, world, ids, None, prompts, seed=6, text=text))
    routed = denoising_loss(gen, world, ids, [loras[c] for c in ids], prompts, seed=5, text=text)
    with apply_lora(gen, loras[0]):
        alone = denoising_loss(gen, world, ids, None, prompts, seed=5, text=text)
    np.testing.assert_allclose(routed[:2], alone[:2], rtol=1e-4)
    np.testing.assert_allclose(routed[2:], base[2:], rtol=1e-5)  # zero LoRA = base
    assert np.abs(routed[:2] - base[:2]).max() > 1e-4


class FakeEvaluators:
    """Recognises case c in a sample whose mean pixel is c / 10; records what score() was given."""

    def score(self, samples, case_ids, prompts=None, references=None):
        self.got = SimpleNamespace(prompts=prompts, references=references)
        guess = (samples.flatten(1).mean(1) * 10).round().long()
        out = {"acc": (guess == torch.tensor(case_ids)).double().numpy()}
        if references is not None:
            out["csd"] = np.full(len(case_ids), 0.5)
        return out


def test_score_cases_frames_per_sample_scores():
    world = World()
    world.task = "styles"
    world.condition = lambda ids, seed: torch.zeros(len(ids), 3, 8, 8)
    ids = [1, 1, 5, 5]
    samples = torch.stack([torch.full(world.shape, v) for v in (0.1, 0.3, 0.5, 0.5)])
    ev = FakeEvaluators()
    frame = score_cases(ev, world, ids, samples, ["p"] * 4, reference_seed=7)
    assert list(frame.columns[:2]) == ["case_id", "split"] and frame.split.tolist() == ["train"] * 2 + ["heldout"] * 2
    assert frame.acc.tolist() == [1, 0, 1, 1] and ev.got.references.shape[0] == 4 and "csd" in frame
    world.task = "actions"  # no reference-based metric: references are not rendered
    frame = score_cases(ev, world, ids, samples, reference_seed=7)
    assert ev.got.references is None and "csd" not in frame


def test_case_means_summarize_and_ratio():
    frame = pd.DataFrame({"method": ["a"] * 4 + ["b"] * 4, "case_id": [1, 1, 2, 2] * 2,
                          "split": ["train", "train", "heldout", "heldout"] * 2,
                          "acc": [1, 0, 1, 1, 0, 0, 1, 0], "clip_t": [0.2] * 8})
    per_case = case_means(frame)
    assert per_case.set_index(["method", "case_id"]).acc.to_dict() == {("a", 1): 0.5, ("a", 2): 1.0,
                                                                        ("b", 1): 0.0, ("b", 2): 0.5}
    table = summarize(per_case, ["acc", "clip_t", "face_sim"], n_boot=200).set_index(["method", "metric"])
    assert set(table.index) == {("a", "acc"), ("a", "clip_t"), ("b", "acc"), ("b", "clip_t")}  # absent metric left out
    row = table.loc[("a", "acc")]
    assert row["mean"] == 0.75 and row.ci_low <= 0.75 <= row.ci_high and row.ci_low >= 0.5 and row.cases == 2
    assert table.loc[("b", "clip_t")].ci_low == pytest.approx(0.2)

    num, den = np.array([0.5, 0.0, 1.0, 0.5]), np.array([1.0, 1.0, 1.0, 0.5])
    ratio, lo, hi = ratio_of_means(num, den, n_boot=300)
    assert ratio == pytest.approx(0.5 / 0.875) and lo <= ratio <= hi and 0 <= lo and hi <= 1.0
    # resamples that draw only cases the reference never recognises are skipped, not turned into NaN bounds
    ratio, lo, hi = ratio_of_means(np.array([0.5, 0.0, 0.0]), np.array([1.0, 0.0, 0.0]), n_boot=300)
    assert ratio == 0.5 and np.isfinite([lo, hi]).all()
    with pytest.raises(LofaError, match="equal-length"):
        ratio_of_means(num, den[:3])
    with pytest.raises(LofaError, match="undefined"):
        ratio_of_means(num, np.zeros(4))


def test_select_cases_keeps_every_heldout_case_and_balances_categories():
    world = StubWorld(n_cases=40, n_coarse=4)
    for i in (3, 17, 22):
        world.cases[i].split = "heldout"
    heldout = world.ids("heldout")
    picked = select_cases(world, max_cases=12, seed=0)
    assert len(picked) == 12 and set(heldout) <= set(picked) and picked == sorted(picked)
    train = [world.cases[c].coarse for c in picked if c not in heldout]
    assert np.bincount(train, minlength=4).max() - np.bincount(train, minlength=4).min() <= 1
    assert select_cases(world, 12, seed=0) == picked and select_cases(world, 12, seed=1) != picked
    assert select_cases(world, None) == list(range(40))
    assert select_cases(world, 2) == heldout  # held-out cases are never dropped, even beyond the cap
    assert set(select_cases(world, 6, among=list(range(20)))) <= set(range(20))
    with pytest.raises(LofaError, match="max_cases"):
        select_cases(world, 0)


def test_base_competence_separates_coarse_from_fine():
    """A 'generator' that returns ground-truth renders of a same-coarse neighbour case: coarse checks pass, the
    exact-case check fails — the shape of result the mini-world base must show."""
    import torch

    from lofa.evaluate import base_competence
    from lofa.worlds import make_world

    world = make_world("identities", "smoke")

    class Referee:  # recognises exact case and coarse category of ground-truth renders by construction
        def __init__(self):
            self.truth = {}

        def score(self, x, ids):
            keys = [self.truth.get(tuple(v.flatten()[:64].tolist()), (-1, -1)) for v in x]
            return {"acc": np.array([float(k[0] == i) for k, i in zip(keys, ids)]),
                    "coarse_acc": np.array([float(k[1] == world.cases[i].coarse) for k, i in zip(keys, ids)])}

        def frechet(self, a, b):
            return float((a.mean(0) - b.mean(0)).pow(2).sum())

    referee = Referee()
    original_render = world.render

    def render(ids, seed, **kw):
        x = original_render(ids, seed, **kw)
        for v, i in zip(x, ids):
            referee.truth[tuple(v.flatten()[:64].tolist())] = (int(i), world.cases[int(i)].coarse)
        return x

    world.render = render
    neighbour = {c.id: next(d.id for d in world.cases if d.coarse == c.coarse and d.id != c.id) for c in world.cases}

    import lofa.evaluate as ev

    def fake_generate(gen, world_, ids, loras, prompts, seeds, **kw):
        return torch.cat([world.render([neighbour[i]], s) for i, s in zip(ids, seeds)])

    original_generate = ev.generate
    ev.generate = fake_generate
    try:
        out = base_competence(None, world, referee, n=8, seed=123)
    finally:
        ev.generate = original_generate
    assert out["coarse_acc_base"] == 1.0 and out["coarse_acc_renders"] == 1.0
    assert out["exact_acc_base_heldout"] == 0.0 and out["exact_acc_renders_heldout"] == 1.0
    # the 'generator' draws other cases of the right category, exactly what the fairer floor renders
    assert out["fd_base_vs_renders"] > 0 and out["fd_other_cases_vs_renders"] > 0


def test_same_coarse_others_are_other_training_cases_of_the_category():
    from lofa.evaluate import same_coarse_others
    from lofa.worlds import make_world

    world = make_world("actions", "smoke")
    train = world.ids("train")
    ids = [int(i) for i in train] * 3
    others = same_coarse_others(world, ids, np.random.default_rng(0))
    for i, j in zip(ids, others):
        assert j in train and world.cases[j].coarse == world.cases[i].coarse
        alone = sum(world.cases[k].coarse == world.cases[i].coarse for k in train) == 1
        assert (j == i) == alone
    assert len(set(others)) > 1


def test_paired_difference_calls_a_verdict_only_when_the_interval_excludes_zero():
    rng = np.random.default_rng(0)
    base = rng.normal(size=40)
    better = paired_difference(base + 1.0 + 0.1 * rng.normal(size=40), base)
    assert better["verdict"] == "better" and better["ci_low"] > 0 and better["cases"] == 40
    assert paired_difference(base + 1.0, base, lower_is_better=True)["verdict"] == "worse"
    assert paired_difference(base - 1.0, base, lower_is_better=True)["verdict"] == "better"
    tie = paired_difference(np.r_[base, np.nan], np.r_[base + rng.normal(scale=1.0, size=40), 0.0])
    assert tie["cases"] == 40 and tie["verdict"] == "no significant difference"


def test_paired_differences_per_group_metric_and_baseline():
    from lofa.evaluate import paired_differences, setting_metrics

    rng = np.random.default_rng(0)
    rows = []
    for setting in ("a", "b"):
        for case in range(6):
            for method, shift in (("LoFA", 0.5), ("base", 0.0), ("other", 0.5)):
                rows.append({"setting": setting, "method": method, "case_id": case,
                             "acc": shift + 0.01 * rng.standard_normal(), "denoise": 1 - shift})
    per_case = pd.DataFrame(rows)
    metrics = {("a",): ["acc", "denoise", "missing"], ("b",): ["acc"]}
    table = paired_differences(per_case, "LoFA", ("base", "other"), metrics, by=("setting",), seed=0)
    assert list(table.columns[:3]) == ["setting", "metric", "baseline"]
    assert list(table.columns[-2:]) == ["verdict", "method"] and set(table.method) == {"LoFA"}
    assert table[["setting", "metric", "baseline"]].values.tolist() == [
        ["a", "acc", "base"], ["a", "acc", "other"], ["a", "denoise", "base"], ["a", "denoise", "other"],
        ["b", "acc", "base"], ["b", "acc", "other"]]
    by = table.set_index(["setting", "metric", "baseline"])
    assert by.loc[("a", "acc", "base"), "verdict"] == "better"
    assert by.loc[("a", "denoise", "base"), "verdict"] == "better"  # lower is better for denoise
    a = per_case[per_case.setting == "a"].pivot(index="case_id", columns="method", values="acc")
    assert by.loc[("a", "acc", "base")].to_dict() == {**paired_difference(a["LoFA"], a["base"], seed=0),
                                                      "method": "LoFA"}
    settings = (("s1", "styles", "image"), ("s2", "actions", "text"))
    assert setting_metrics(settings) == {("s1",): [*METRICS["styles"], "denoise"],
                                         ("s2",): [*METRICS["actions"], "denoise"]}
    assert list(setting_metrics(settings, ("heldout", "train"))) == [("s1", "heldout"), ("s1", "train"),
                                                                      ("s2", "heldout"), ("s2", "train")]
    named = paired_differences(per_case, "LoFA", ("base",), metrics, by=("setting",), baseline_column="reference")
    assert "reference" in named and "baseline" not in named


def test_preference_counts_wins_ties_and_losses_per_case_and_turns_lower_is_better_around():
    rows = []
    # case 0: LoFA wins both pairs on acc; case 1: one tie, one loss; case 2: never scored by "LoRA" (left out)
    for case, samples, lofa, lora in ((0, (0, 1), (1.0, 1.0), (0.0, 0.0)), (1, (2, 3), (1.0, 0.0), (1.0, 1.0))):
        for sample, a, b in zip(samples, lofa, lora):
            rows.append({"setting": "s", "method": "LoFA", "sample": sample, "case_id": case, "acc": a,
                         "denoise": 0.1 * a})
            rows.append({"setting": "s", "method": "LoRA", "sample": sample, "case_id": case, "acc": b,
                         "denoise": 0.1 * b})
    rows.append({"setting": "s", "method": "LoFA", "sample": 4, "case_id": 2, "acc": 1.0, "denoise": 0.0})
    scores = pd.DataFrame(rows)
    table = preference(scores, "LoFA", "LoRA", {("s",): ["acc", "denoise", "missing"]}, by=("setting",), seed=0)
    by = table.set_index("metric")
    assert list(by.index) == ["acc", "denoise"]
    # per case: 1.0 and (0.5 + 0) / 2 = 0.25 -> 0.625 over the two cases that have both methods
    assert by.loc["acc", "share"] == 0.625 and by.loc["acc", "cases"] == 2 and by.loc["acc", "pairs"] == 4
    assert by.loc["acc", "ci_low"] <= 0.625 <= by.loc["acc", "ci_high"]
    # denoise is lower-is-better: LoFA's higher denoise loses where its acc wins
    assert by.loc["denoise", "share"] == 1 - 0.625
    assert set(table.method) == {"LoFA"} and set(table.against) == {"LoRA"}


def test_bf16_sampling_is_close_to_float32_and_float32_outside_the_generator():
    world, text, gen = World(), StubText(), tiny_generator().eval()
    ids, prompts, seeds = eval_plan(world, [0, 2], per_case=2, seed=3)
    loras = {0: _lora(gen, 1), 2: _lora(gen, 2)}
    routed = [loras[c] for c in ids]  # the batched LoRA routing runs under autocast too
    x = generate(gen, world, ids, routed, prompts, seeds, cfg=CFG, text=text, progress=False)
    half = generate(gen, world, ids, routed, prompts, seeds, cfg=dataclasses.replace(CFG, precision="bf16"),
                    text=text, progress=False)
    assert half.dtype == torch.float32  # the latents and the Euler update stay float32
    difference = (half - x).abs().mean() / x.abs().mean()
    assert 0 < difference < 0.05, difference  # autocast was on, and bf16 keeps the samples
    assert all(p.dtype == torch.float32 for p in gen.parameters())
    with pytest.raises(LofaError, match="precision"):
        GenerateConfig(precision="fp16")
