"""Every configuration dataclass documents itself peft-style: a class docstring, and on every field a
`metadata={"help": ...}` that says what the field means. A field added without its help fails here."""
import dataclasses
import importlib

import pytest

# (module, class): every configuration dataclass of lofa, each listed once.
CONFIG_CLASSES = [
    ("lofa.diffusion", "TimeDistribution"),
    ("lofa.metrics.evaluators", "EvalConfig"),
    ("lofa.lora.zoo", "ZooConfig"),
    ("lofa.lora.train", "LoraTrainConfig"),
    ("lofa.worlds.styles", "StylesConfig"),
    ("lofa.worlds.actions", "ActionsConfig"),
    ("lofa.worlds.identities", "IdentitiesConfig"),
    ("lofa.baselines.text_to_lora", "TextToLoraConfig"),
    ("lofa.baselines.hyper_dreambooth", "HyperDreamBoothConfig"),
    ("lofa.baselines.diff_lora", "DiffLoraConfig"),
    ("lofa.models.image_unet", "ImageUNetConfig"),
    ("lofa.models.train_base", "BaseTrainConfig"),
    ("lofa.models.video_dit", "VideoDiTConfig"),
    ("lofa.models.cond_encoders", "CondEncoderConfig"),
    ("lofa.evaluate", "GenerateConfig"),
    ("lofa.evaluate", "ScoringConfig"),
    ("lofa.hypernet.config", "HyperConfig"),
    ("lofa.hypernet.data", "TripletConfig"),
    ("lofa.hypernet.train", "TrainConfig"),
    ("lofa.hypernet.train", "Stage2TrainConfig"),
]


def config_class(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


def missing_help(cls: type) -> list[str]:
    """The fields of `cls` whose help is absent, empty, not a string or only the field's name."""
    bad = []
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help")
        words = text.strip().strip(".").replace("_", " ").lower() if isinstance(text, str) else ""
        if not words or words == f.name.replace("_", " ").lower():
            bad.append(f.name)
    return bad


@pytest.mark.parametrize("module, name", CONFIG_CLASSES, ids=[name for _, name in CONFIG_CLASSES])
def test_every_field_has_a_help_text(module, name):
    cls = config_class(module, name)
    assert dataclasses.is_dataclass(cls) and dataclasses.fields(cls)
    assert missing_help(cls) == [], f"{name}: give these fields metadata={{'help': ...}}: {missing_help(cls)}"


@pytest.mark.parametrize("module, name", CONFIG_CLASSES, ids=[name for _, name in CONFIG_CLASSES])
def test_class_has_a_docstring(module, name):
    cls = config_class(module, name)
    doc = (cls.__doc__ or "").strip()
    # without a docstring, @dataclass writes the signature "Name(field: type = ..., ...)" into __doc__
    assert doc and not doc.startswith(f"{name}("), f"{name} has no class docstring"


def test_a_field_added_without_help_is_caught():
    @dataclasses.dataclass
    class Documented:
        """A config whose one field is documented."""

        rank: int = dataclasses.field(default=4, metadata={"help": "LoRA rank r of every adapter."})

    @dataclasses.dataclass
    class Extended(Documented):
        """The same config with two undocumented fields."""

        alpha: float = 4.0
        group_size: int = dataclasses.field(default=8, metadata={"help": "group size"})

    assert missing_help(Documented) == []
    assert missing_help(Extended) == ["alpha", "group_size"]


def test_the_list_holds_every_overridable_config():
    from lofa.config import OVERRIDABLE
    from lofa.models.generator import GENERATOR_CONFIGS

    listed = {config_class(module, name) for module, name in CONFIG_CLASSES}
    assert len(listed) == len(CONFIG_CLASSES)
    assert {config_class(module, name) for module, name in OVERRIDABLE.values()} <= listed
    assert set(GENERATOR_CONFIGS.values()) <= listed
