"""The three procedural worlds: API shapes, determinism, case counts and splits, prompts, conditions, and that the
cases are really different pictures. CPU, small sizes (smoke worlds; mini / full only where counts are the point).

Gallery for eyes (not run by pytest):  python tests/test_worlds.py [scale]  -> /tmp/worlds_gallery_<task>.png
"""
from __future__ import annotations

import itertools

import pytest
import torch

from lofa.errors import LofaError
from lofa.worlds import WORLD_TASKS, Case, make_world

MIN_CASES = {"actions": 150, "styles": 100, "identities": 150}   # at mini, from the issue


@pytest.fixture(scope="module", params=WORLD_TASKS)
def world(request):
    return make_world(request.param, "smoke", seed=0)


def test_api_shapes_and_range(world):
    ids = [0, 1, len(world.cases) - 1]
    x = world.render(ids, seed=0)
    assert x.dtype == torch.float32 and x.shape == (3, *world.shape)
    assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.1
    c = world.condition(ids, seed=0)
    assert c.dtype == torch.float32 and -1 <= c.min() and c.max() <= 1
    expected = (3, *world.shape) if world.task == "actions" else (3, 3, world.cfg.height, world.cfg.width)
    assert c.shape == expected
    assert world.modality == ("image" if world.task == "identities" else "video")
    assert all(isinstance(k, Case) and k.id == i for i, k in enumerate(world.cases))
    assert 0 < len(world.coarse_names) <= 8
    assert sorted(world.ids("train") + world.ids("heldout")) == list(range(len(world.cases)))
    assert len({k.name for k in world.cases}) == len(world.cases)
    frame = world.describe()
    assert len(frame) == len(world.cases) and {"id", "name", "coarse", "split"} <= set(frame.columns)
    with pytest.raises(LofaError):
        world.render([len(world.cases)], seed=0)
    with pytest.raises(LofaError):
        world.ids("test")


def test_deterministic_given_seed(world):
    ids = list(range(6))
    assert torch.equal(world.render(ids, seed=3), world.render(ids, seed=3))
    assert not torch.allclose(world.render(ids, seed=3), world.render(ids, seed=4))
    assert torch.equal(world.condition(ids, seed=3), world.condition(ids, seed=3))
    # the case set and split depend only on the world seed
    again = make_world(world.task, "smoke", seed=0)
    assert [(k.name, k.split) for k in again.cases] == [(k.name, k.split) for k in world.cases]
    other = make_world(world.task, "smoke", seed=1)
    assert [k.split for k in other.cases] != [k.split for k in world.cases]


def test_appearance_varies_within_a_case(world):
    x = world.render([0] * 8, seed=0).flatten(1)
    assert torch.cdist(x, x).fill_diagonal_(float("inf")).min() > 1.0   # no two samples of a case coincide


@pytest.mark.parametrize("task", WORLD_TASKS)
@pytest.mark.parametrize("scale", ["smoke", "mini", "full"])
def test_counts_and_heldout_split(task, scale):
    w = make_world(task, scale)
    n = len(w.cases)
    held = w.ids("heldout")
    assert {"smoke": 20 <= n <= 40, "mini": n >= MIN_CASES[task], "full": n >= 1000}[scale]
    assert len(held) >= 0.2 * n
    # every component value (and coarse class) of a held-out case occurs in some training case
    seen = {(k, str(v)) for c in w.cases if c.split == "train" for k, v in c.attrs.items()}
    seen_coarse = {c.coarse for c in w.cases if c.split == "train"}
    for i in held:
        c = w.cases[i]
        assert {(k, str(v)) for k, v in c.attrs.items()} <= seen and c.coarse in seen_coarse
    # held-out cases are unseen combinations: no training case has the same attributes
    train_attrs = {tuple(sorted((k, str(v)) for k, v in c.attrs.items())) for c in w.cases if c.split == "train"}
    assert all(tuple(sorted((k, str(v)) for k, v in w.cases[i].attrs.items())) not in train_attrs for i in held)


def test_prompts(world):
    assert world.n_prompts("train") >= 3 and world.n_prompts("eval") >= 1
    for case in world.cases[:5]:
        train = [world.prompt(case.id, v, "train") for v in range(world.n_prompts("train"))]
        held = [world.prompt(case.id, v, "eval") for v in range(world.n_prompts("eval"))]
        assert len(set(train)) == len(train)
        assert not set(held) & set(train)
        assert all(p and len(p.split()) <= 24 and ",," not in p and "  " not in p for p in train + held)
        if world.task == "identities":
            assert all("[V]" in p for p in train + held)
    if world.task != "identities":   # fine prompts name the case: no two cases share a phrasing
        prompts = [world.prompt(c.id, 0) for c in world.cases]
        assert len(set(prompts)) == len(prompts)
    coarse = [world.coarse_prompt(k, v) for k in range(len(world.coarse_names)) for v in range(3)]
    assert len(set(coarse)) == len(coarse)
    assert world.coarse_prompt(0, 1000) in [world.coarse_prompt(0, v) for v in range(6)]
    with pytest.raises(LofaError):
        world.prompt(0, world.n_prompts("train"))


def test_sample_captions_name_content_and_context():
    from lofa.worlds.styles import GENERIC_CONTENT

    styles = make_world("styles", "smoke")
    x, prompts = styles.sample([0, 1, 2, 3], seed=0)
    assert x.shape == (4, *styles.shape) and len(prompts) == 4
    assert not any(generic in p for p in prompts for generic in GENERIC_CONTENT)   # the content is named
    a = styles.render([0, 0], seed=1, content=["ball-bouncing", "box-sliding"])
    b = styles.render([0, 0], seed=1, content=["ball-bouncing", "ball-bouncing"])
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert "ball" in styles.prompt(0, 0, content="ball-bouncing")
    faces = make_world("identities", "smoke")
    plain, hat = faces.render([0, 0], seed=2), faces.render([0, 0], seed=2, context=["", "hat"])
    assert torch.equal(plain[0], hat[0]) and not torch.equal(plain[1], hat[1])
    assert "hat" in faces.prompt(0, 0, context="hat") and "hat" not in faces.prompt(0, 0)
    _, coarse = faces.sample(list(range(8)), seed=0, level="coarse")
    assert all("[V]" not in p for p in coarse)
    with pytest.raises(LofaError):
        faces.prompt(0, 0, content="ball-bouncing")


def _changed_pixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixels (over all frames) whose colour differs clearly (> 0.2 in some channel), averaged over samples."""
    return ((a - b).abs().amax(-3 if a.ndim == 4 else 1) > 0.2).flatten(1).sum(1).float().mean()


def test_cases_are_distinct_pictures(world):
    """With appearance held fixed (same seed, same batch layout), every pair of cases differs in a clearly
    visible patch (at least 8 pixels; smoke sizes are 16 x 16)."""
    x = [world.render([i] * 2, seed=7) for i in range(len(world.cases))]
    for i, j in itertools.combinations(range(len(x)), 2):
        assert _changed_pixels(x[i], x[j]) >= 8, (world.cases[i].name, world.cases[j].name)


@pytest.mark.parametrize("task", WORLD_TASKS)
def test_one_component_changes_the_picture(task):
    """Mini: cases that differ in one component only still differ visibly under fixed appearance."""
    w = make_world(task, "mini")
    for base in w.cases[:3]:
        for k in base.attrs:
            other = [c for c in w.cases if [j for j in c.attrs if c.attrs[j] != base.attrs[j]] == [k]]
            for c in other[:1]:
                a, b = w.render([base.id] * 2, seed=1), w.render([c.id] * 2, seed=1)
                assert _changed_pixels(a, b) >= 20, (base.name, c.name)


def test_pose_condition_follows_the_joint_motion():
    w = make_world("actions", "smoke")
    ids = list(range(len(w.cases)))
    a = w.condition(ids, seed=0)
    assert torch.equal(a, w.condition(ids, seed=1))          # canonical: the pose sequence is the case
    jittered = make_world("actions", "smoke", overrides={"pose_jitter": 0.03})
    assert not torch.equal(jittered.condition(ids, seed=0), jittered.condition(ids, seed=1))
    assert len({c.flatten().sum().item() for c in a}) == len(ids)   # every case has its own pose sequence
    # when the skeleton moves, the rendered figure moves: per-frame motion energy agrees over time
    energy = lambda v: (v[:, :, 1:] - v[:, :, :-1]).abs().mean((1, 3, 4))           # [N, T-1]
    r = w.render(ids, seed=2)
    e_pose, e_render = energy(a), energy(r)
    e_pose, e_render = e_pose - e_pose.mean(1, keepdim=True), e_render - e_render.mean(1, keepdim=True)
    corr = (e_pose * e_render).sum(1) / (e_pose.norm(dim=1) * e_render.norm(dim=1) + 1e-8)
    assert corr.mean() > 0.5


def test_styles_reference_shows_other_content():
    from lofa.worlds.styles import REFERENCE_SHAPES, SHAPES

    assert not set(REFERENCE_SHAPES) & set(SHAPES)
    w = make_world("styles", "smoke")
    refs = w.condition([0, 0], seed=0), w.condition([0, 0], seed=1)
    assert not torch.equal(refs[0], refs[1])


def test_identities_are_far_apart():
    w = make_world("identities", "mini")
    keys = list(w.cases[0].attrs)
    rows = torch.tensor([[w.vocab[k].index(c.attrs[k]) for k in keys] for c in w.cases])
    dist = (rows[:, None] != rows[None]).sum(-1) + torch.eye(len(rows), dtype=torch.long) * 99
    assert dist.min() >= w.cfg.min_distance


def test_bad_input_is_refused():
    with pytest.raises(LofaError):
        make_world("music")
    with pytest.raises(LofaError):
        make_world("actions", "smoke", overrides={"parts": ("tail",)})
    with pytest.raises(LofaError):
        make_world("styles", "smoke").render([0], seed=0, content=["cat-dancing"])
    with pytest.raises(LofaError):
        make_world("identities", "smoke").render([0], seed=0, context=["crown"])
    with pytest.raises(ValueError):
        make_world("actions", "smoke", overrides={"colour": 1})


def _gallery(scale: str = "mini") -> None:
    """Per task a PNG grid: rows = cases, columns = frames of two renders and the condition."""
    import numpy as np
    from PIL import Image

    def tile(img):   # [3, H, W] in [-1, 1] -> uint8 [4H, 4W, 3] with a 1 px border
        a = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return np.pad(np.kron(a, np.ones((4, 4, 1), np.uint8)), ((1, 1), (1, 1), (0, 0)), constant_values=128)

    for task in WORLD_TASKS:
        w = make_world(task, scale)
        ids = torch.randperm(len(w.cases), generator=torch.Generator().manual_seed(0))[:10].tolist()
        x1, x2, c = w.render(ids, seed=0), w.render(ids, seed=1), w.condition(ids, seed=0)
        rows = []
        for i in range(len(ids)):
            if w.modality == "video":
                cells = list(x1[i].unbind(1)) + list(x2[i].unbind(1))[:4]
                cells += list(c[i].unbind(1)) if c.ndim == 5 else [c[i]]
            else:
                cells = [c[i]] + list(w.render([ids[i]] * 6, seed=i).unbind(0))
            rows.append(np.concatenate([tile(t) for t in cells], 1))
            print(task, ids[i], w.cases[ids[i]].name, "|", w.prompt(ids[i], 0))
        Image.fromarray(np.concatenate(rows, 0)).save(f"/tmp/worlds_gallery_{task}.png")


if __name__ == "__main__":
    import sys

    _gallery(*sys.argv[1:])


def test_empty_phrases_leave_no_dangling_punctuation():
    from lofa.worlds.base import _tidy

    assert _tidy("sunset palette, striped texture, thin outlines, : a ball") == \
        "sunset palette, striped texture, thin outlines: a ball"
    assert _tidy("a ,  , b") == "a, b"
