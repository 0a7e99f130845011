"""The paper's qualitative figures (lofa.figures): what each shows and how its tiles are laid out."""
import torch

from lofa.baselines import hyper_dreambooth
from lofa.figures import CONDITION, FIGURES, _as_tiles, figure_name
from lofa.run import SETTINGS


def test_every_setting_has_its_paper_figure_with_lofa_and_the_truth():
    assert set(FIGURES) == {name for name, *_ in SETTINGS}
    assert [FIGURES[s].figure for s in ("actions-text", "actions-pose", "styles", "identities")] == [
        "Fig. 4", "Fig. 5", "Fig. 6", "Fig. 7"]
    for setting, spec in FIGURES.items():
        assert "LoFA" in spec.rows and "ground truth" in spec.rows and spec.cases >= 1
        assert (CONDITION in spec.rows) == (setting != "actions-text")  # a text condition is the column title
    assert {"per-case LoRA", "Text-to-LoRA", "base"} <= set(FIGURES["actions-text"].rows)
    assert hyper_dreambooth.FINETUNED in FIGURES["identities"].rows
    names = [figure_name(s) for s in FIGURES]
    assert names[0] == "07_fig4_actions_text" and len(set(names)) == 4


def test_a_reference_image_beside_videos_becomes_a_still():
    image = torch.rand(2, 3, 16, 16)
    still = _as_tiles(image, (3, 8, 16, 16))
    assert still.shape == (2, 3, 8, 16, 16) and all(torch.equal(still[:, :, t], image) for t in range(8))
    assert _as_tiles(image, (3, 16, 16)) is image  # images beside images stay as they are
    video = torch.rand(2, 3, 8, 16, 16)
    assert _as_tiles(video, (3, 8, 16, 16)) is video
