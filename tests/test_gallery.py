"""Notebook 01's views of the worlds (lofa.gallery) on the smoke worlds."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from lofa.gallery import case_label, conditions_figure, identities_gallery, pick_cases, world_summary  # noqa: E402
from lofa.worlds import WORLD_TASKS, make_world  # noqa: E402


@pytest.fixture(scope="module")
def worlds():
    return {task: make_world(task, "smoke", seed=0) for task in WORLD_TASKS}


def test_world_summary_one_row_per_task(worlds):
    table = world_summary(worlds, seed=0)
    assert list(table.task) == list(WORLD_TASKS)
    assert table["held-out components seen in training"].all()
    assert (table.cases == table.train + table["held-out"]).all()


def test_pick_cases_spreads_over_coarse_categories_and_labels_name_them(worlds):
    world = worlds["styles"]
    ids = pick_cases(world, "train", 3, seed=0)
    assert len(set(ids)) == 3 and set(ids) <= set(world.ids("train")) and ids == pick_cases(world, "train", 3, seed=0)
    coarse = [world.cases[i].coarse for i in ids]
    assert len(set(coarse)) == min(3, len(world.coarse_names))
    held = world.ids("heldout")[0]
    label = case_label(world, held)
    assert label.startswith(world.cases[held].name) and "nearest training case" in label and "eval: " in label


def test_gallery_and_conditions_figures_draw(worlds):
    import matplotlib.pyplot as plt

    for fig in (identities_gallery(worlds["identities"], seed=0), conditions_figure(worlds, seed=0, n=2)):
        assert len(fig.axes) >= 2
        plt.close(fig)
    fig = conditions_figure({"styles": worlds["styles"]}, seed=0, n=2)  # a run of some tasks: their panels only
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["styles: reference image → style (renders: "
                                                                     "middle frame)"]
    plt.close(fig)
