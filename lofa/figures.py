"""The paper's qualitative figures from a run's trained methods: Figs. 4–7 (held-out cases, one strip per method)
and a Fig. 1-style overview (each task's condition, LoFA's sample, and adaptation time against the per-case LoRA's).

Each figure shows the first held-out cases of a setting (`FigureSpec.cases`), one sample per case and method drawn
with the same prompt and noise for every method (`evaluate.compare`, so the samples are the kind notebook 07
scores), and the condition LoFA read (the reserved "eval" view, `Triplets.condition_inputs`) where the paper shows
it. Videos are drawn as filmstrips, a reference image beside a video as a still.

    shown, samples = qualitative_samples(run, "identities", EvalSeeds.of(0))    # one sample per case and row
    fig = lofa.viz.sample_panels([figure_panel(run, "identities", shown, samples)])
    fig = lofa.viz.sample_panels(overview_panels(run, {"identities": (shown, samples)}, costs))   # Fig. 1 style
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lofa.baselines import hyper_dreambooth

CONDITION = "condition"  # the row of a figure that shows what LoFA read


@dataclass(frozen=True)
class FigureSpec:
    """One of the paper's qualitative figures: its number, the setting it shows, its rows (methods of notebook 07,
    and `CONDITION`) and how many held-out cases (columns) it shows."""

    figure: str
    title: str
    rows: tuple[str, ...]
    cases: int


# The paper's rows: Fig. 4 per-case LoRA / Text-to-LoRA / base / LoFA on text-conditioned action video; Fig. 5 pose /
# LoRA / LoFA; Fig. 6 reference / LoRA / LoFA; Fig. 7 reference / DreamBooth (our per-case LoRA) / HyperDreamBooth /
# LoFA. Ground truth comes first: only a known world can show it.
FIGURES = {
    "actions-text": FigureSpec("Fig. 4", "text-conditioned action video", (
        "ground truth", "per-case LoRA", "Text-to-LoRA", "base", "LoFA"), 2),
    "actions-pose": FigureSpec("Fig. 5", "pose-conditioned action video", (
        CONDITION, "ground truth", "per-case LoRA", "LoFA"), 2),
    "styles": FigureSpec("Fig. 6", "text-to-video stylization", (
        CONDITION, "ground truth", "per-case LoRA", "LoFA"), 3),
    "identities": FigureSpec("Fig. 7", "identity-personalized images", (
        CONDITION, "ground truth", "per-case LoRA", hyper_dreambooth.FINETUNED, "LoFA"), 4),
}


def figure_name(setting: str) -> str:
    """The file stem of a setting's figure in the run's figures folder, e.g. "07_fig7_identities"."""
    return f"07_{FIGURES[setting].figure.lower().replace('. ', '')}_{setting.replace('-', '_')}"


def _as_tiles(condition: torch.Tensor, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """A condition batch in the samples' layout: a reference image [N, 3, H, W] beside videos [N, 3, T, H, W]
    becomes a still video (repeated over T)."""
    if condition.ndim == 4 and len(sample_shape) == 4:
        return condition[:, :, None].expand(-1, -1, sample_shape[1], -1, -1)
    return condition


def qualitative_samples(run, setting: str, seeds) -> tuple[list[int], dict]:
    """The figure's first held-out cases of a setting and one sample per case of each method its figure shows ->
    (case ids, {row: tiles [N, *world.shape]}), the condition row included."""
    from lofa.evaluate import GenerateConfig, compare
    from lofa.hypernet.predictor import predict_cases
    from lofa.run import parse_setting

    spec = FIGURES[setting]
    _, task, _ = parse_setting(setting)
    data = run.triplets(setting)
    shown = sorted(data.heldout_ids)[:spec.cases]
    bank = data.conditions("eval")
    methods = {}
    for row in spec.rows:
        if row == "base":
            methods[row] = None
        elif row == "per-case LoRA":
            methods[row] = {c: data.zoo.load(c)[0] for c in shown}
        elif row == "LoFA":
            methods[row] = predict_cases(run.hypernet(setting), bank, shown)
        elif row == "Text-to-LoRA":
            methods[row] = predict_cases(run.text_to_lora(setting), bank, shown)
        elif row == hyper_dreambooth.FINETUNED:
            loras, _ = hyper_dreambooth.hyper_dreambooth_loras(run, setting, shown, seeds.sample)
            methods[row] = loras[row]
    _, samples = compare(run.base(task), run.world(task), run.evaluators(task), methods, shown, per_case=1,
                         seeds=seeds, cfg=run.config(GenerateConfig), return_samples=True)
    if CONDITION in spec.rows:
        samples[CONDITION] = _as_tiles(data.condition_inputs(shown), tuple(samples["LoFA"].shape[1:]))
    return shown, {row: samples[row].cpu() for row in spec.rows}


def _column_names(run, setting: str, shown: list[int]) -> list[str]:
    """A figure's column titles: the reserved prompt LoFA read (text), else the case's name."""
    data = run.triplets(setting)
    return data.condition_inputs(shown) if data.kind == "text" else [data.world.cases[c].name for c in shown]


def figure_panel(run, setting: str, shown: list[int], samples: dict) -> tuple[str, torch.Tensor, list[str], list[str]]:
    """The panel of `lofa.viz.sample_panels` for a setting's figure from `qualitative_samples`' result: its rows,
    its held-out cases as columns."""
    spec = FIGURES[setting]
    rows = [f"{row} ({run.triplets(setting).kind})" if row == CONDITION else row for row in spec.rows]
    return (f"{spec.figure} · {spec.title} · held-out cases", torch.cat([samples[r] for r in spec.rows]), rows,
            _column_names(run, setting, shown))


def overview_panels(run, examples: dict, costs) -> list[tuple[str, torch.Tensor, list[str], list[str]]]:
    """A Fig. 1-style overview: per setting of `examples` ({setting: `qualitative_samples`' result}), its first
    held-out case's condition (where it is not text), ground truth and LoFA's sample, titled with LoFA's prediction
    time against a per-case LoRA's training time on this run's device. costs: notebook 07's method table
    (`report.method_costs` rows: setting, method, predict_ms, per_case_lora_train_s)."""
    panels = []
    for setting, (shown, samples) in examples.items():
        cost = costs[(costs.setting == setting) & (costs.method == "LoFA")].iloc[0]
        rows = [row for row in (CONDITION, "ground truth", "LoFA") if row in samples]
        title = (f"{setting}: LoFA predicts its LoRA in {cost.predict_ms:.0f} ms; a per-case LoRA trains in "
                 f"{cost.per_case_lora_train_s:.1f} s")
        panels.append((title, torch.cat([samples[row][:1] for row in rows]), rows,
                       _column_names(run, setting, shown[:1])))
    return panels
