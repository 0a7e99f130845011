"""Reference predictors (lofa.baselines.reference) on a real smoke run of the styles setting: its base generator,
its zoo of trained per-case LoRAs and its reference-image condition bank (built once, ~20 s on one core)."""
import copy
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lofa.analysis import response_map
from lofa.baselines import (RidgeLora, mean_lora, mean_train_map, nearest_cases, nearest_lora, oracle_case,
                            oracle_lora, pool_condition)
from lofa.errors import LofaError
from lofa.evaluate import GenerateConfig, generate
from lofa.hypernet.data import ConditionBank
from lofa.lora.formats import LoraFactor, load_lora, save_lora
from lofa.lora.zoo import PIPELINE_PREFIX, Zoo
from lofa.run import Run
from lofa.worlds import Case


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run("smoke", "cpu", 0, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def data(run):
    return run.triplets("styles")


def _mean_delta(zoo, case_ids):
    """{module: mean ΔW [out, in]} of these cases' LoRAs, float64, the plain way."""
    total = {}
    for case in case_ids:
        weights, _ = zoo.load(case)
        for name, f in weights.items():
            total[name] = total.get(name, 0) + (f.alpha / f.rank) * (f.B.double() @ f.A.double())
    return {name: t / len(case_ids) for name, t in total.items()}


def _delta(weights):
    return {name: f.scale * (f.B.double() @ f.A.double()) for name, f in weights.items()}


def _frobenius_error(approx, exact):
    err = sum(float((approx[n] - exact[n]).square().sum()) for n in exact)
    return (err / sum(float(exact[n].square().sum()) for n in exact)) ** 0.5


def test_mean_lora_is_the_training_mean_up_to_its_stated_truncation_error(data):
    zoo = data.zoo
    exact = _mean_delta(zoo, zoo.case_ids("train"))
    weights, info = mean_lora(zoo)
    assert info["cases"] == zoo.case_ids("train") and info["rank"] == zoo.config.rank
    assert set(weights) == set(exact) and all(f.rank == zoo.config.rank for f in weights.values())
    # 21 rank-4 LoRAs average to more than rank 4: the cut loses something, and says exactly how much
    stated = info["relative_error"]
    assert 1e-3 < stated < 1 and stated == pytest.approx(_frobenius_error(_delta(weights), exact), rel=1e-4)
    for name, err in info["module_errors"].items():
        one = {name: exact[name]}
        assert err == pytest.approx(_frobenius_error({name: _delta(weights)[name]}, one), rel=1e-4, abs=1e-7)
    # a higher rank loses less; the full rank (and anything above it, clipped per module) loses nothing
    assert mean_lora(zoo, rank=8)[1]["relative_error"] < stated
    full, info_full = mean_lora(zoo, rank=10_000)
    assert info_full["relative_error"] < 1e-6
    for name, d in _delta(full).items():
        assert full[name].rank == min(exact[name].shape)
        torch.testing.assert_close(d, exact[name], rtol=0, atol=1e-5 * float(exact[name].abs().max()))
    with pytest.raises(LofaError, match="positive integer"):
        mean_lora(zoo, rank=0)


def _rewrite(zoo_dir, case, factor):
    """Scale one case's LoRA file by `factor` (same metadata, same name)."""
    path = zoo_dir / Zoo(zoo_dir)[case]["file"]
    weights, meta = load_lora(path)
    save_lora(path, {n: LoraFactor(f.A, f.B * factor, f.alpha) for n, f in weights.items()}, meta,
              prefix=PIPELINE_PREFIX["video_dit"])


def test_mean_lora_uses_only_training_split_loras(data, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(data.zoo.dir, copy)
    before, _ = mean_lora(Zoo(copy), rank=10_000)
    _rewrite(copy, data.zoo.case_ids("heldout")[0], 10.0)
    after, _ = mean_lora(Zoo(copy), rank=10_000)
    for name in before:
        torch.testing.assert_close(_delta(after)[name], _delta(before)[name])
    # ...while a training LoRA's change shows (so the check above could have failed)
    _rewrite(copy, data.zoo.case_ids("train")[0], 10.0)
    changed, _ = mean_lora(Zoo(copy), rank=10_000)
    assert max(float((_delta(changed)[n] - _delta(before)[n]).abs().max()) for n in before) > 1e-4


def test_nearest_lora_finds_a_training_case_by_its_own_condition_and_never_a_heldout_one(data):
    bank = data.conditions("train")
    for case in data.train_ids[:5]:
        for view in range(bank.views):
            tokens, mask = bank.get([case], [view])
            weights, info = nearest_lora(data, tokens[0], mask[0])
            assert info["case_id"] == case and info["similarity"] == pytest.approx(1.0, abs=1e-6)
    expected, _ = data.zoo.load(data.train_ids[4])
    assert all(torch.equal(weights[n].A, expected[n].A) and torch.equal(weights[n].B, expected[n].B)
               for n in expected)
    # a held-out case's own condition is in the bank, but its LoRA is what the reference is scored against
    for case in data.heldout_ids:
        tokens, mask = bank.get([case])
        _, info = nearest_lora(data, tokens, mask)
        assert info["case_id"] in data.train_ids and info["similarity"] < 1 - 1e-6
    # the reserved (eval-seed) condition of a held-out case retrieves a training case as well
    tokens, mask = data.conditions("eval").get(data.heldout_ids[:1])
    assert nearest_lora(data, tokens, mask)[1]["case_id"] in data.train_ids
    with pytest.raises(LofaError, match="one condition"):
        nearest_lora(data, *data.conditions("eval").get(data.heldout_ids[:2]))


def test_nearest_cases_pools_only_valid_tokens_and_breaks_ties_by_lowest_id():
    # cases 7 and 3 store the same condition, case 5 another; padded tokens hold junk that must not count
    tokens = torch.zeros(3, 1, 3, 2)
    mask = torch.tensor([True, True, False]).expand(3, 1, 3).clone()
    tokens[0, 0, :2] = torch.tensor([[1.0, 0.0], [1.0, 0.2]])   # case 7
    tokens[1, 0, :2] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])   # case 5
    tokens[2, 0, :2] = tokens[0, 0, :2]                          # case 3
    tokens[:, 0, 2] = torch.tensor([[0.0, 50.0], [50.0, 0.0], [0.0, 50.0]])
    bank = ConditionBank([7, 5, 3], tokens, mask)
    query = torch.tensor([[[2.0, 0.2], [0.0, 0.0], [-9.0, 9.0]]])  # = case 7's mean direction over its 2 tokens
    ids, sim = nearest_cases(bank, [7, 5, 3], query, torch.tensor([[True, False, False]]))
    assert ids == [3] and float(sim[0]) == pytest.approx(1.0)
    assert nearest_cases(bank, [7, 5], query, torch.tensor([[True, False, False]]))[0] == [7]
    # unmasked, the junk token pulls the query towards case 5
    assert nearest_cases(bank, [7, 5, 3], query)[0] == [5]
    torch.testing.assert_close(pool_condition(tokens[:, 0], mask[:, 0])[0], torch.tensor([1.0, 0.1]).double())
    with pytest.raises(LofaError, match="no valid token"):
        pool_condition(query, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(LofaError, match="no condition for case 9"):
        nearest_cases(bank, [9], query)


def test_oracle_lora_returns_the_case_itself_or_the_training_case_sharing_most_attributes(data):
    world, zoo = data.world, data.zoo
    for case in data.train_ids:
        _, info = oracle_lora(world, zoo, case)
        assert info["case_id"] == case and info["matches"] == info["attributes"] == len(world.cases[case].attrs)
    for case in data.heldout_ids:
        weights, info = oracle_lora(world, zoo, case)
        query = world.cases[case].attrs
        shared = {c: sum(world.cases[c].attrs[k] == v for k, v in query.items()) for c in data.train_ids}
        best = max(shared.values())
        assert info["case_id"] in data.train_ids and info["matches"] == shared[info["case_id"]] == best
        assert best < len(query)  # held out: an unseen combination, no training case has all of it
        tied = [c for c in data.train_ids if shared[c] == best]
        same = [c for c in tied if world.cases[c].coarse == world.cases[case].coarse]
        assert info["case_id"] == min(same or tied) and info["same_coarse"] == bool(same)
        expected, _ = zoo.load(info["case_id"])
        assert all(torch.equal(weights[n].B, expected[n].B) for n in expected)


def test_oracle_case_prefers_more_shared_attributes_then_the_coarse_category_then_the_lowest_id():
    def case(i, coarse, **attrs):
        return Case(i, f"c{i}", attrs, coarse, "train")

    world = SimpleNamespace(cases=[case(0, 1, a=1, b=1, c=1), case(1, 0, a=1, b=1, c=2), case(2, 0, a=1, b=2, c=2),
                                   case(3, 1, a=1, b=2, c=2), case(4, 0, a=2, b=1, c=1), case(5, 1, a=1, b=1, c=9)])
    assert oracle_case(world, 0, [1, 2, 3, 4, 5]) == (5, 2)   # 1 and 5 share two; 5 has 0's coarse category
    assert oracle_case(world, 0, [1, 2, 3, 4]) == (1, 2)
    assert oracle_case(world, 0, [4, 3, 2]) == (4, 2)         # 4 shares b and c
    assert oracle_case(world, 0, [3, 2]) == (3, 1)            # a tie in attributes; 3 has 0's coarse category
    assert oracle_case(world, 1, [5, 0, 2]) == (2, 2)         # a three-way tie; only 2 has 1's coarse category
    assert oracle_case(world, 1, [5, 0]) == (0, 2)            # a tie in both: the lowest id
    assert oracle_case(world, 2, [2, 3]) == (2, 3)            # a candidate case is its own oracle


def test_attribute_features_are_one_hot_per_component_and_the_oracle_ridge_fits_a_linear_world():
    """attribute_features: one 1 per component, equal rows for equal attributes. On LoRAs whose ΔW is linear in the
    one-hot attributes, the oracle ridge (`fit_attributes` on the train cases) predicts a held-out case's ΔW."""
    from lofa.baselines import attribute_features

    def case(i, split, **attrs):
        return Case(i, f"c{i}", attrs, 0, split)

    values = [(a, b) for a in range(3) for b in range(2)]
    world = SimpleNamespace(cases=[case(i, "heldout" if i == 5 else "train", a=a, b=b)
                                   for i, (a, b) in enumerate(values)])
    x = attribute_features(world, range(6))
    assert x.shape == (6, 5) and torch.equal(x.sum(1), torch.full((6,), 2.0, dtype=torch.float64))
    assert torch.equal(attribute_features(world, [4, 4])[0], x[4])
    g = torch.Generator().manual_seed(0)
    effects = torch.randn(5, 4 * 2, generator=g, dtype=torch.float64)         # B's share of each attribute value
    a = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def lora(i):  # rank 2, one A for all: ΔW = B A with B linear in the attributes
        return {"m": LoraFactor(a.float(), (x[i] @ effects).reshape(4, 2).float(), 2.0)}

    train = [0, 1, 2, 3, 4]
    data = SimpleNamespace(train_ids=train, world=world, zoo=SimpleNamespace(
        load=lambda c: (lora(c), {}), config=SimpleNamespace(rank=2)))
    ridge = RidgeLora.fit_attributes(data, lam=1e-9)
    [(pred, _)] = ridge.predict(attribute_features(world, [5])[:, None])
    assert _frobenius_error(_delta(pred), _delta(lora(5))) < 1e-3


def test_mean_train_map_is_the_mean_of_the_training_response_maps(data):
    ref = mean_train_map(data, chunk=5)
    assert ref.dtype == torch.float32 and ref.shape[0] == len(data.spec)
    assert ref.min() >= 0 and ref.max() <= 1
    assert ((ref > 0) & (ref < 1)).any()  # the training LoRAs disagree somewhere: not a trivial map
    # the same maps through the analysis module's |ΔW/W| > τ, one zoo file at a time
    loras = [data.zoo.load(c)[0] for c in data.train_ids]
    for t, target in enumerate(data.spec.targets):
        o, i = target.shape
        w = data.base[t]
        maps = torch.stack([response_map(lora[target.name].delta_w, w) for lora in loras]).float()
        torch.testing.assert_close(ref[t, :o, :i], maps.mean(0))
        assert not ref[t, o:].any() and not ref[t, :, i:].any()  # map_size padding
    # chunking does not matter, and τ is honoured
    torch.testing.assert_close(mean_train_map(data, chunk=64), ref)
    assert mean_train_map(data, tau=0.5).sum() < ref.sum()


def test_reference_loras_sample_through_generate(run, data):
    gen, world = run.base("styles"), data.world
    case = data.heldout_ids[0]
    tokens, mask = data.conditions("eval").get([case])
    loras = [mean_lora(data.zoo)[0], nearest_lora(data, tokens, mask)[0], oracle_lora(world, data.zoo, case)[0]]
    cfg = GenerateConfig(steps=2, batch=4)
    prompt = world.prompt(case, 0)
    x = generate(gen, world, [case] * 3, loras, [prompt] * 3, [5] * 3, cfg=cfg, progress=False)
    base = generate(gen, world, [case], None, [prompt], [5], cfg=cfg, progress=False)
    assert x.shape == (3, *world.shape) and torch.isfinite(x).all()
    assert all(float((x[i] - base[0]).abs().max()) > 1e-4 for i in range(3))  # each LoRA changed the sample


def test_reference_loras_and_compare_score_every_method_on_the_same_plan(run, data):
    """`reference_loras` gives each method one LoRA per case (the mean LoRA shared), and `compare` scores every
    method on the same samples: a method listed twice under two names gets identical scores, ground truth joins
    without a denoising loss, and a LoRA changes the scores of a sample against the base."""
    from lofa.baselines import REFERENCES, reference_loras
    from lofa.evaluate import EvalSeeds, compare

    cases = data.heldout_ids[:2] + data.train_ids[:2]
    loras, sources = reference_loras(data, cases)
    assert set(loras) == set(REFERENCES) and all(set(v) == set(cases) for v in loras.values())
    assert len({id(w) for w in loras["mean LoRA"].values()}) == 1
    oracle = sources[sources.method == "oracle LoRA"].set_index("case_id").source_case
    assert all(oracle[c] == c for c in data.train_ids[:2])          # a training case's oracle is itself
    assert all(oracle[c] in data.train_ids for c in data.heldout_ids[:2])

    methods = {"base": None, "base again": None, "mean LoRA": loras["mean LoRA"]}
    table, samples = compare(run.base("styles"), run.world("styles"), run.evaluators("styles"), methods, cases,
                             per_case=1, seeds=EvalSeeds.of(0), cfg=GenerateConfig(steps=2), return_samples=True)
    assert list(table.method.unique()) == list(samples) == ["ground truth", "base", "base again", "mean LoRA"]
    assert all(x.shape == (len(cases), *data.world.shape) for x in samples.values())
    assert torch.equal(samples["base"], samples["base again"])
    assert len(table) == 4 * len(cases)
    by = {m: f.drop(columns="method").reset_index(drop=True) for m, f in table.groupby("method")}
    assert by["base"].equals(by["base again"])
    assert by["ground truth"].denoise.isna().all() and by["base"].denoise.notna().all()
    assert not np.allclose(by["base"].denoise, by["mean LoRA"].denoise)
    assert EvalSeeds.of(1).sample - EvalSeeds.of(0).sample == 100_000


# --- the ridge LoRA ----------------------------------------------------------------------------------------------
def _linear_world(n_cases=6, views=2, dim=5, seed=0):
    """Cases whose pooled condition x_c [dim] maps affinely to ΔW_c = (B0 + Σ_d x_cd B_d) A, rank 2, [9, 7].

    Returns (inputs [n_cases·views, dim], owners, loras, deltas {case: ΔW float64}, the map (A, B [dim+1, 9, 2]))."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, 7, generator=g, dtype=torch.float64)
    B = torch.randn(dim + 1, 9, 2, generator=g, dtype=torch.float64)
    x = torch.randn(n_cases, dim, generator=g, dtype=torch.float64)
    loras, deltas = {}, {}
    for c in range(n_cases):
        Bc = B[0] + torch.einsum("d,dor->or", x[c], B[1:])
        loras[c] = {"m": LoraFactor(A.float(), Bc.float(), 2.0)}
        deltas[c] = Bc.float().double() @ A.float().double()
    owners = [c for c in range(n_cases) for _ in range(views)]
    return x.repeat_interleave(views, 0).float(), owners, loras, deltas, (A, B)


def test_ridge_lora_is_exact_on_a_linear_world_and_interpolates_at_tiny_lambda():
    inputs, owners, loras, deltas, (A, B) = _linear_world(n_cases=10, dim=4)
    ridge = RidgeLora(inputs, owners, loras, lam=1e-9, rank=2)
    # a new condition of the same affine world is predicted exactly: 10 cases determine the 5-parameter map
    query = torch.randn(1, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = (B[0] + torch.einsum("d,dor->or", query[0], B[1:])) @ A
    [(lora, info)] = ridge.predict(query[:, None].float())
    torch.testing.assert_close(lora["m"].delta_w.double(), expected, rtol=1e-3, atol=1e-3)
    assert info["relative_error"] < 1e-4 and info["lam"] == 1e-9 and lora["m"].rank == 2
    # a training condition gets its own case's ΔW back; every case-weight row sums to 1
    weights = ridge.case_weights(inputs[:3, None])
    # (λ = 1e-9 makes the solve ill-conditioned: the rows sum to 1 only to ~1e-7)
    torch.testing.assert_close(weights.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)
    [(own, _)] = ridge.predict(inputs[:1, None])
    torch.testing.assert_close(own["m"].delta_w.double(), deltas[0], rtol=1e-3, atol=1e-3)


def test_ridge_lora_tends_to_the_mean_at_huge_lambda():
    inputs, owners, loras, deltas, _ = _linear_world()
    mean = sum(deltas.values()) / len(deltas)
    far = inputs[:1, None] * 3
    [(lora, _)] = RidgeLora(inputs, owners, loras, lam=1e12, rank=2).predict(far)
    torch.testing.assert_close(lora["m"].delta_w.double(), mean, rtol=1e-4, atol=1e-5)
    # ...while a moderate λ follows the condition (so the check above could have failed)
    [(moved, _)] = RidgeLora(inputs, owners, loras, lam=0.1, rank=2).predict(far)
    assert float((moved["m"].delta_w.double() - mean).abs().max()) > 1e-2


def test_ridge_lora_refuses_bad_input():
    inputs, owners, loras, _, _ = _linear_world()
    with pytest.raises(LofaError, match="lam must be positive"):
        RidgeLora(inputs, owners, loras, lam=0.0)
    with pytest.raises(LofaError, match="one owner per row"):
        RidgeLora(inputs, owners[:-1], loras)
    with pytest.raises(LofaError, match="has no LoRA"):
        RidgeLora(inputs, owners, {c: w for c, w in loras.items() if c != 0})
    with pytest.raises(LofaError, match="at least one training LoRA"):
        RidgeLora(inputs, owners, {})
    with pytest.raises(LofaError, match=r"must be \[N, K, 5\]"):
        RidgeLora(inputs, owners, loras).predict(torch.zeros(1, 3, 4))


def _with_zoo(data, zoo):
    """The same triplets reading their LoRAs from another zoo directory."""
    other = copy.copy(data)
    other.zoo = zoo
    return other


def test_ridge_lora_fits_on_training_loras_only(data, tmp_path):
    tokens, mask = data.conditions("eval").get(data.heldout_ids[:1])
    before = RidgeLora.fit(data).predict(tokens, mask)[0][0]
    assert all(f.rank == data.zoo.config.rank for f in before.values())
    zoo_copy = tmp_path / "zoo"
    shutil.copytree(data.zoo.dir, zoo_copy)
    _rewrite(zoo_copy, data.zoo.case_ids("heldout")[0], 10.0)
    after = RidgeLora.fit(_with_zoo(data, Zoo(zoo_copy))).predict(tokens, mask)[0][0]
    for name in before:
        torch.testing.assert_close(after[name].delta_w, before[name].delta_w)
    # ...while a training LoRA's change shows
    _rewrite(zoo_copy, data.zoo.case_ids("train")[0], 10.0)
    changed = RidgeLora.fit(_with_zoo(data, Zoo(zoo_copy))).predict(tokens, mask)[0][0]
    assert max(float((changed[n].delta_w - before[n].delta_w).abs().max()) for n in before) > 1e-5


def test_steps_to_reach_finds_the_first_step_at_the_per_case_level():
    from lofa.baselines.initialisation import steps_to_reach

    rows = [("per-case LoRA", 100, 0.6), ("ground truth", np.nan, 0.9)]
    rows += [("recipe start", k, v) for k, v in ((0, 0.1), (50, 0.4), (100, 0.5))]
    rows += [("LoFA (x)", k, v) for k, v in ((0, 0.3), (50, 0.7), (100, 0.8))]
    quality = pd.DataFrame([{"task": "styles", "start": s, "steps": k, "metric": m, "mean": v if m == "acc" else 0.0}
                            for s, k, v in rows for m in ("acc", "denoise")])
    reached = steps_to_reach(quality)
    assert list(reached.start) == ["recipe start", "LoFA (x)"]
    assert reached.set_index("start").steps_to_reach.isna().loc["recipe start"]
    assert reached.set_index("start").steps_to_reach.loc["LoFA (x)"] == 50
    assert (reached.per_case_lora_acc == 0.6).all() and list(reached.acc_at_0) == [0.1, 0.3]
    assert (reached.recipe_steps == 100).all()
