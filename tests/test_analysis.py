"""Response maps: chunked float32 statistics against an independent float64 computation, structure, similarity."""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from lofa.analysis import (analyze_lora, block_depths, chance_iou, cosine, depth_type_profile, group_response, iou,
                           lora_response, map_strip, module_exceedance, module_order, module_response, module_type,
                           pairwise_similarity, permutation_test, plot_response_map, plot_response_rows,
                           relative_change, response_map, response_table, sweep_table, variance_explained)
from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor

TAU, EPS = 0.02, 1e-8
SHAPES = {"blocks.0.attn1.to_q": (24, 20), "blocks.0.attn2.to_k": (24, 16), "blocks.1.attn1.to_out.0": (24, 24),
          "blocks.1.ffn.net.0.proj": (40, 20), "blocks.10.attn2.to_v": (24, 16)}


def reference(w, factor, eps=EPS):
    """Relative change in float64 numpy, independent of the code under test."""
    A, B, W = (t.double().numpy() for t in (factor.A, factor.B, w))
    return np.abs(factor.alpha / A.shape[0] * B @ A) / (np.abs(W) + eps)


def make_case(seed=0, shapes=SHAPES, tau=TAU):
    """Base weights with exact zeros and a LoRA (alpha != rank, one zero row of B), no entry within 0.1 % of τ."""
    g = torch.Generator().manual_seed(seed)
    base, lora = {}, {}
    for name, (out, inp) in shapes.items():
        w = torch.randn(out, inp, generator=g) * 0.1
        w[torch.rand(out, inp, generator=g) < 0.1] = 0.0
        r = 2 if "ffn" in name else 4
        B = torch.randn(out, r, generator=g) * 0.05
        B[3] = 0.0  # ΔW row 3 is exactly 0: inactive even where W = 0
        factor = LoraFactor(A=torch.randn(r, inp, generator=g) * 0.05, B=B, alpha=3.0)
        m = reference(w, factor)
        tie = np.abs(m / tau - 1) < 1e-3
        w[torch.from_numpy(tie)] *= 1.5  # move borderline entries well below τ
        base[name], lora[name] = w, factor
    return base, lora


def test_relative_change_elementwise_with_zero_weights():
    delta = torch.tensor([[0.01, 0.0, 1e-9], [-0.3, 0.02, 0.0]])
    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, -1.0, 2.0]])
    expected = np.abs(delta.double().numpy()) / (np.abs(w.double().numpy()) + EPS)
    np.testing.assert_allclose(relative_change(delta, w).numpy(), expected, rtol=1e-6)
    # |W| = 0: any nonzero ΔW responds (1e-9 / 1e-8 = 0.1 > τ), a zero ΔW does not
    assert response_map(delta, w).tolist() == [[False, False, True], [True, False, False]]
    assert relative_change(delta.bfloat16(), w.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("chunk_elements", [1, 7 * 20, 1 << 22])
def test_module_response_chunked_equals_float64(chunk_elements):
    base, lora = make_case()
    name = "blocks.0.attn1.to_q"
    m = reference(base[name], lora[name])
    got = module_response(lora[name], base[name], TAU, pool=4, chunk_elements=chunk_elements)
    assert got.shape == (24, 20) and got.active == int((m > TAU).sum())
    assert 0 < got.active < got.numel
    assert got.mean_relative_change == pytest.approx(m.mean(), rel=1e-6)
    cells = (m > TAU).reshape(4, 6, 4, 5).mean(axis=(1, 3))  # 4 × 4 cells of 6 rows × 5 columns
    np.testing.assert_allclose(got.pooled.numpy(), cells, rtol=1e-6)
    uneven = module_response(lora[name], base[name], TAU, pool=7, chunk_elements=chunk_elements).pooled
    sizes = np.outer(np.bincount(np.arange(24) * 7 // 24), np.bincount(np.arange(20) * 7 // 20))
    assert uneven.shape == (7, 7) and (uneven.numpy() * sizes).sum() == pytest.approx(got.active)


def test_zero_weights_respond_unless_delta_is_zero():
    base, lora = make_case()
    name = "blocks.1.attn1.to_out.0"
    w, f = base[name], lora[name]
    r = response_map(f.delta_w, w)
    zero = w == 0
    assert zero.any() and r[zero & (f.delta_w != 0)].all()
    assert not r[3].any()  # ΔW row 3 is exactly zero


def test_analyze_lora_matches_float64_and_schema():
    base, lora = make_case(seed=1)
    out = analyze_lora(base, lora, TAU)
    assert set(out) == {"tau", "active_fraction", "modules"} and out["tau"] == TAU
    assert list(out["modules"]) == ["blocks.0.attn1.to_q", "blocks.0.attn2.to_k", "blocks.1.attn1.to_out.0",
                                    "blocks.1.ffn.net.0.proj", "blocks.10.attn2.to_v"]  # natural order
    active = numel = 0
    for name, stats in out["modules"].items():
        m = reference(base[name], lora[name])
        assert set(stats) == {"shape", "active_fraction", "mean_relative_change"}
        assert stats["shape"] == list(SHAPES[name])
        assert stats["active_fraction"] == (m > TAU).sum() / m.size
        assert stats["mean_relative_change"] == pytest.approx(m.mean(), rel=1e-6)
        active, numel = active + (m > TAU).sum(), numel + m.size
    assert out["active_fraction"] == pytest.approx(active / numel, rel=1e-12)


def test_lora_response_refuses_bad_base():
    base, lora = make_case()
    with pytest.raises(LofaError, match="blocks.10.attn2.to_v.* not in the base"):
        lora_response({k: v for k, v in base.items() if k != "blocks.10.attn2.to_v"}, lora, progress=False)
    base["blocks.0.attn2.to_k"][0, 0] = float("nan")
    with pytest.raises(LofaError, match="'blocks.0.attn2.to_k' contains NaN"):
        lora_response(base, lora, progress=False)


def test_module_types_and_depths():
    wan = ["blocks.0.attn1.to_q", "blocks.12.attn1.to_out.0", "blocks.3.attn2.to_v", "blocks.3.attn2.add_k_proj",
           "blocks.2.ffn.net.0.proj", "blocks.2.ffn.net.2", "proj_out"]
    assert [module_type(n) for n in wan] == ["self_q", "self_o", "cross_v", "cross_k_img", "ffn_in", "ffn_out",
                                             "other"]
    assert block_depths(wan) == {"blocks.0.attn1.to_q": 0, "blocks.12.attn1.to_out.0": 12, "blocks.3.attn2.to_v": 3,
                                 "blocks.3.attn2.add_k_proj": 3, "blocks.2.ffn.net.0.proj": 2,
                                 "blocks.2.ffn.net.2": 2, "proj_out": None}
    unet = ["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"]
    assert [module_type(n) for n in unet] == ["self_q", "ffn_out", "cross_k", "self_k"]
    assert list(block_depths(unet).values()) == [3, 1, 2, 0]  # down, mid, up order


def test_group_response_is_element_weighted():
    base, lora = make_case(seed=2)
    table = response_table(lora_response(base, lora, progress=False))
    assert table["depth"].tolist() == [0, 0, 1, 1, 10]
    by_depth = group_response(table, "depth").set_index("depth")
    names = ["blocks.1.attn1.to_out.0", "blocks.1.ffn.net.0.proj"]
    maps = [reference(base[n], lora[n]) > TAU for n in names]
    assert by_depth.loc[1, "active_fraction"] == pytest.approx(sum(m.sum() for m in maps) / sum(m.size for m in maps))
    by_type = group_response(table, ["depth", "module_type"])
    assert len(by_type) == 5 and set(by_type["module_type"]) == {"self_q", "cross_k", "self_o", "ffn_in", "cross_v"}


def test_iou_and_cosine():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert iou(a, b) == pytest.approx(1 / 3) and cosine(a, b) == pytest.approx(0.5)
    assert iou(a, a) == 1.0 and np.isnan(iou(a & False, b & False)) and np.isnan(cosine(a & False, b))


def brute_force_similarity(base, loras, names):
    maps = []
    for lora in loras:
        m = [reference(base[n], lora[n]) if n in lora else np.zeros(base[n].shape) for n in names]
        maps.append(np.concatenate([x.ravel() for x in m]))
    maps = np.stack(maps)
    r = (maps > TAU).astype(float)
    inter = r @ r.T
    union = r.sum(1)[:, None] + r.sum(1)[None] - inter
    return inter / union, inter / np.sqrt(np.outer(r.sum(1), r.sum(1))), \
        (maps @ maps.T) / np.sqrt(np.outer((maps ** 2).sum(1), (maps ** 2).sum(1)))


def test_pairwise_similarity_full_maps_match_brute_force():
    base, lora0 = make_case(seed=3)
    _, lora1 = make_case(seed=4)
    lora1 = {n: lora1[n] for n in list(lora1)[:3]}  # lacks two modules: ΔW = 0 there
    # LoRA 1's factors on LoRA 0's base may land near τ; compare maps only where float64 is clear of it
    for n, f in lora1.items():
        m = reference(base[n], f)
        base[n][torch.from_numpy(np.abs(m / TAU - 1) < 1e-3)] *= 1.5
    loras = [lora0, lora1, lora0]
    expected = brute_force_similarity(base, loras, list(SHAPES))
    for samples in (None, 10_000):  # 10,000 > every module's size: full maps too
        got = pairwise_similarity(base, loras, TAU, samples_per_module=samples, progress=False)
        for key, exp in zip(("iou", "cosine", "cosine_relative"), expected):
            np.testing.assert_allclose(got[key], exp, rtol=1e-6)
    assert got["iou"][0, 2] == 1.0 and 0 < got["iou"][0, 1] < 1


def test_pairwise_similarity_sampled_estimates_full():
    base, lora0 = make_case(seed=5, shapes={"blocks.0.attn1.to_q": (64, 64), "blocks.1.attn1.to_q": (64, 64)})
    _, lora1 = make_case(seed=6, shapes={"blocks.0.attn1.to_q": (64, 64), "blocks.1.attn1.to_q": (64, 64)})
    full = pairwise_similarity(base, [lora0, lora1], progress=False, samples_per_module=None)
    sampled = pairwise_similarity(base, [lora0, lora1], progress=False, samples_per_module=2000, seed=1)
    again = pairwise_similarity(base, [lora0, lora1], progress=False, samples_per_module=2000, seed=1)
    np.testing.assert_array_equal(sampled["iou"], again["iou"])  # a fixed index set per seed
    assert abs(sampled["iou"][0, 1] - full["iou"][0, 1]) < 0.05
    assert abs(sampled["cosine"][0, 1] - full["cosine"][0, 1]) < 0.05
    np.testing.assert_allclose(np.diag(sampled["iou"]), 1.0)


def test_plot_is_written_atomically(tmp_path):
    base, lora = make_case()
    responses = lora_response(base, lora, pool=8, progress=False)
    plot_response_map(responses, tmp_path / "map.png", TAU, title="case")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_response_map(lora_response(base, lora, progress=False), tmp_path / "heat_only.pdf", TAU)
    assert (tmp_path / "heat_only.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(LofaError, match="unsupported figure type 'xyz'"):
        plot_response_map(responses, tmp_path / "map.xyz", TAU)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat_only.pdf", "map.png"]


# --- τ sweep, profiles and the within- vs across-group test (notebook 04) -----------------------------------------
def test_module_exceedance_matches_float64_at_every_tau():
    base, lora = make_case(seed=7)
    name = "blocks.0.attn2.to_k"
    _, other = make_case(seed=12)
    low_rank = LoraFactor(A=other[name].A[:2], B=other[name].B[:, :2], alpha=5.0)  # another rank and alpha
    factors = [lora[name], low_rank, lora[name]]
    m = [reference(base[name], f) for f in factors]
    taus = [0.2, 0.005, TAU, 0.05, 0.0]  # unsorted on purpose
    for chunk in (16, 2 * 24 * 16, 1 << 22):  # row blocks of one LoRA, two whole LoRAs, all at once
        counts, sums = module_exceedance(factors, base[name], taus, chunk_elements=chunk)
        assert counts.shape == (3, 5)
        for i in range(3):
            expected = np.array([(m[i] > t).sum() for t in taus])
            borderline = np.array([(np.abs(m[i] - t) <= 1e-5 * t).sum() for t in taus])  # float32 vs float64 ties
            assert (np.abs(counts[i] - expected) <= borderline).all()
            assert sums[i] == pytest.approx(m[i].sum(), rel=1e-6)
        assert counts[0].tolist() == counts[2].tolist() == [int((m[0] > t).sum()) for t in taus]
    assert counts[0, 2] == module_response(lora[name], base[name], TAU).active
    assert counts[1, 2] == module_response(low_rank, base[name], TAU).active
    assert counts[0, 4] == int((m[0] > 0).sum()) < m[0].size  # ΔW row 3 is zero: not above τ = 0


def test_sweep_table_and_depth_type_profile():
    base, lora0 = make_case(seed=8)
    _, lora1 = make_case(seed=9)
    lora1 = {n: f for n, f in lora1.items() if n != "blocks.10.attn2.to_v"}
    table = sweep_table(base, [("a", lora0), ("b", lora1)], [0.01, TAU], progress=False)
    assert len(table) == 2 * (5 + 4) and set(table.columns) >= {"lora", "module", "depth", "module_type", "tau",
                                                                "active", "active_fraction"}
    at_tau = table[table.tau == TAU]
    assert at_tau.lora.tolist() == ["a"] * 5 + ["b"] * 4 and at_tau.module.tolist()[:5] == list(SHAPES)
    expected = analyze_lora(base, lora0, TAU)["modules"]
    got = at_tau[at_tau.lora == "a"].set_index("module")
    for name, stats in expected.items():
        assert got.loc[name, "active_fraction"] == stats["active_fraction"]
        assert got.loc[name, "sum_relative_change"] / got.loc[name, "numel"] == pytest.approx(
            stats["mean_relative_change"], rel=1e-9)
    # depths 0, 0, 1, 1, 10 in two bins: 0-5 -> bin 0, 10 -> bin 1 (· 2 // 11)
    profile = depth_type_profile(at_tau, n_bins=2)
    assert list(profile.columns) == [(0, "self_q"), (0, "self_o"), (0, "cross_k"), (0, "ffn_in"), (1, "cross_v")]
    assert list(profile.index) == ["a", "b"] and np.isnan(profile.loc["b", (1, "cross_v")])
    assert profile.loc["a", (0, "cross_k")] == expected["blocks.0.attn2.to_k"]["active_fraction"]
    with pytest.raises(LofaError, match="one τ"):
        depth_type_profile(table, n_bins=2)


def test_variance_explained():
    assert variance_explained([1, 1, 5, 5], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert variance_explained([1, 5, 1, 5], ["a", "a", "b", "b"]) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    values, groups = rng.normal(size=30), rng.integers(0, 4, 30)
    within = sum(((values[groups == g] - values[groups == g].mean()) ** 2).sum() for g in range(4))
    assert variance_explained(values, groups) == pytest.approx(1 - within / ((values - values.mean()) ** 2).sum())
    assert np.isnan(variance_explained([2.0, 2.0], [0, 1]))
    assert variance_explained([1, 1, 5, 5], [None, None, 3, 3]) == pytest.approx(1.0)  # e.g. modules outside blocks


def test_chance_iou_matches_independent_random_maps():
    rng = np.random.default_rng(4)
    numel = np.array([3000, 1000, 6000])
    fractions = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.4], [0.0, 0.0, 0.0]])
    maps = [np.concatenate([rng.random(k) < f for k, f in zip(numel, row)]) for row in fractions[:2]]
    got = chance_iou(fractions, numel)
    assert got[0, 1] == pytest.approx(iou(torch.from_numpy(maps[0]), torch.from_numpy(maps[1])), abs=0.01)
    assert got[0, 1] == got[1, 0] and np.isnan(got[2, 2]) and got[0, 2] == 0.0
    assert got[0, 0] < 1  # two independent draws of one map overlap by chance only


def block_similarity(labels, within, across, noise, seed):
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    sim = np.where(labels[:, None] == labels[None], within, across) + noise * rng.normal(size=(len(labels),) * 2)
    return (sim + sim.T) / 2


def test_permutation_test_detects_group_structure_only_when_present():
    labels = np.repeat(["x", "y", "z"], 6)
    strong = permutation_test(block_similarity(labels, 0.7, 0.2, 0.05, 0), labels, n_perm=500, seed=0)
    assert strong["difference"] == pytest.approx(0.5, abs=0.05) and strong["p_value"] == 1 / 501
    assert strong["n_within_pairs"] == 3 * 15 and strong["n_across_pairs"] == 153 - 45
    null = permutation_test(block_similarity(labels, 0.4, 0.4, 0.1, 1), labels, n_perm=500, seed=0)
    assert null["p_value"] > 0.05
    reverse = permutation_test(block_similarity(labels, 0.2, 0.7, 0.05, 2), labels, n_perm=500, seed=0)
    assert reverse["p_value"] > 0.95  # one-sided: less alike within groups is no evidence
    again = permutation_test(block_similarity(labels, 0.4, 0.4, 0.1, 1), labels, n_perm=500, seed=0)
    assert again == null


def test_permutation_test_statistic_and_p_value_against_enumeration():
    rng = np.random.default_rng(3)
    sim = rng.uniform(size=(6, 6))
    sim = (sim + sim.T) / 2
    sim[0, 4] = sim[4, 0] = np.nan  # an undefined pair is left out
    labels = np.array([0, 0, 0, 1, 1, 1])

    def stat(lab):
        pairs = [(i, j) for i in range(6) for j in range(i + 1, 6) if not np.isnan(sim[i, j])]
        same = [sim[i, j] for i, j in pairs if lab[i] == lab[j]]
        diff = [sim[i, j] for i, j in pairs if lab[i] != lab[j]]
        return np.mean(same), np.mean(diff)

    got = permutation_test(sim, labels, n_perm=4000, seed=0)
    within, across = stat(labels)
    assert got["within"] == pytest.approx(within) and got["across"] == pytest.approx(across)
    observed = within - across
    shuffles = [np.array(p) for p in itertools.permutations(labels)]
    exact = np.mean([np.subtract(*stat(p)) >= observed - 1e-12 for p in shuffles])
    assert 0.05 < exact < 0.95  # a case where the p-value is not at a bound
    assert got["p_value"] == pytest.approx(exact, abs=0.03)
    with pytest.raises(LofaError, match="no same-label pair"):
        permutation_test(sim, np.arange(6), n_perm=10)


def test_map_strip_and_response_rows_plot(tmp_path):
    names = ["blocks.1.attn2.to_q", "blocks.0.attn1.to_out.0", "blocks.0.attn1.to_q", "proj_out",
             "blocks.0.attn2.to_k", "blocks.10.attn1.to_v"]
    assert module_order(names) == ["blocks.0.attn1.to_q", "blocks.0.attn1.to_out.0", "blocks.0.attn2.to_k",
                                   "blocks.1.attn2.to_q", "blocks.10.attn1.to_v", "proj_out"]
    base, lora = make_case(seed=10)
    responses = lora_response(base, lora, pool=4, progress=False)
    modules = ["blocks.0.attn1.to_q", "blocks.99.attn1.to_q", "blocks.0.attn2.to_k"]  # the middle one is absent
    strip = map_strip(responses, modules, cell=8, gap=2)
    assert strip.shape == (8, 3 * 10 - 2)
    pooled = responses["blocks.0.attn1.to_q"].pooled.numpy()
    np.testing.assert_array_equal(strip[:, :8], np.kron(pooled, np.ones((2, 2))))
    assert np.isnan(strip[:, 8:20]).all() and not np.isnan(strip[:, 20:]).any()
    with pytest.raises(LofaError, match="no pooled map"):
        map_strip(lora_response(base, lora, progress=False), modules)
    _, other = make_case(seed=11)
    panels = {"task a": [("case 0", responses), ("case 1", lora_response(base, other, pool=4, progress=False))],
              "task b": [("case 2", responses)]}
    plot_response_rows(panels, tmp_path / "fig2.png", TAU, cell=6)
    assert (tmp_path / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _zoo_sweep():
    """A long sweep table of two tasks (two LoRAs each, two modules, three τ) and its case table."""
    rows, cases = [], []
    for task in ("actions", "styles"):
        for lora in (0, 1):
            cases.append({"task": task, "lora": lora, "case": f"c{lora}", "coarse": lora, "family": f"f{lora}",
                          "split": "train"})
            for depth, module, numel in ((0, "blocks.0.attn1.to_q", 100), (1, "blocks.1.attn2.to_k", 300)):
                for tau, active in ((0.01, 60), (0.02, 30 + 10 * lora), (0.05, 5)):
                    rows.append({"task": task, "lora": lora, "module": module, "depth": depth,
                                 "module_type": "self_q" if depth == 0 else "cross_k", "numel": numel, "tau": tau,
                                 "active": active, "active_fraction": active / numel,
                                 "sum_relative_change": 0.01 * numel})
    return pd.DataFrame(rows), pd.DataFrame(cases)


def test_zoo_sparsity_eta_and_tau_sweep_tables():
    from lofa.analysis import (depth_type_verdicts, sparsity_tables, sparsity_verdicts, tau_sweep_summary,
                               tau_sweep_verdicts, variance_explained_table)

    sweep, cases = _zoo_sweep()
    at_tau = sweep[np.isclose(sweep.tau, 0.02)]
    per_lora, sparsity = sparsity_tables(at_tau, cases, paper_below=(0.5, 0.95))
    assert len(per_lora) == 4 and {"case", "family", "split"} <= set(per_lora.columns)
    assert np.allclose(per_lora.fraction_below, [1 - 60 / 400, 1 - 80 / 400] * 2)
    assert list(sparsity.task) == ["actions", "styles", "all"] and list(sparsity.loras) == [2, 2, 4]
    assert np.isclose(sparsity.set_index("task").loc["all", "mean_fraction_below"], 1 - 70 / 400)
    assert (sparsity.share_in_paper_band == 1).all()
    assert "inside the paper's" in sparsity_verdicts(sparsity, (0.5, 0.95))[0]
    eta = variance_explained_table(at_tau)
    assert list(eta.columns) == ["task", "eta2_module_type", "eta2_depth", "eta2_module", "eta2_lora"]
    assert ((eta.drop(columns="task") >= 0) & (eta.drop(columns="task") <= 1)).all().all()
    assert len(depth_type_verdicts(at_tau, eta)) == 2
    tau_sweep = tau_sweep_summary(sweep)
    assert len(tau_sweep) == 6 and np.allclose(tau_sweep.fraction_below_mean, 1 - tau_sweep.active_fraction_mean)
    row = tau_sweep[(tau_sweep.task == "styles") & (tau_sweep.tau == 0.02)].iloc[0]
    assert np.isclose(row.active_fraction_mean, 70 / 400) and np.isclose(row.active_fraction_min, 60 / 400)
    assert len(tau_sweep_verdicts(tau_sweep, tau=0.02)) == 2


def test_one_delta_w_everywhere():
    """ΔW has one implementation (lofa.response.delta_w): the LoRA file's, the losses' and LoRA training's agree
    bit for bit, and the response map is relative_change > τ."""
    from lofa.hypernet.losses import delta
    from lofa.lora.formats import LoraFactor
    from lofa.lora.train import _delta
    from lofa.response import TAU, delta_w, relative_change, response_map

    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 12, generator=g).half(), torch.randn(10, 4, generator=g).half()
    w = torch.randn(10, 12, generator=g)
    f = LoraFactor(A, B, 8.0)
    expect = 2.0 * (B.float() @ A.float())
    assert torch.equal(f.delta_w, expect) and torch.equal(delta_w(A, B, 2.0), expect)
    assert torch.equal(delta((A[None], B[None], 8.0))[0], expect)
    assert torch.equal(_delta(f, w), expect)
    assert torch.equal(response_map(expect, w), relative_change(expect, w) > TAU)
