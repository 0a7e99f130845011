"""Text-to-LoRA, the baseline (lofa.baselines.text_to_lora): it learns the zoo, its LoRA depends on the condition,
loads into the base through diffusers, survives a save / load, and refuses a condition of the wrong width.

A smoke world and generator with a zoo whose LoRAs are built from each case's attributes (attention and FFN
targets: 64x64, 128x64 and 64x128), a stub text encoder; tiny CPU sizes on one thread.
"""
import copy
import dataclasses
import zlib

import pytest
import torch
from safetensors.torch import load_file
from test_diffusers_loading import check_loaded, key_warnings  # noqa: F401  (key_warnings is a fixture)
from test_hypernet_data import CFG, RANK, StubText, fake_zoo

from lofa.baselines import TextToLora, TextToLoraConfig, train_text_to_lora
from lofa.config import preset
from lofa.errors import LofaError
from lofa.hypernet.data import Triplets, delta_l1_per_case
from lofa.hypernet.losses import delta
from lofa.hypernet.predictor import predict_cases
from lofa.hypernet.tokenizer import TargetSpec
from lofa.hypernet.train import TrainConfig
from lofa.lora.formats import LoraFactor, save_lora
from lofa.models.generator import Generator
from lofa.worlds import make_world

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 80
TRAIN = TrainConfig(steps=STEPS, warmup_steps=10, batch_size=8, lr=3e-3, checkpoint_every=STEPS)


def part(name, key, shape, scale):
    """A fixed random tensor for (module, key): the same in every case that has this key."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}|{key}".encode()))
    return torch.randn(shape, generator=g) * scale


def attribute_factor(case, name, shape, g):
    """A LoRA made of its case's attributes: one A for the zoo (a shared init) and B = a common part plus one part
    per attribute value, so the LoRA follows the condition and the zoo has a mean worth learning."""
    out_f, in_f = shape
    A = part(name, "A", (RANK, in_f), 0.3)
    B = part(name, "B", (out_f, RANK), 0.05)
    for k, v in case.attrs.items():
        B = B + part(name, f"{k}={v}", (out_f, RANK), 0.02)
    return LoraFactor(A, B, float(RANK))


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    torch.manual_seed(0)
    world = make_world("actions", "smoke")
    gen = Generator.build("video_dit", "smoke", {"text_dim": StubText.dim}).eval()
    zoo = fake_zoo(tmp_path_factory.mktemp("zoo"), world, gen, include_ffn=True, factor=attribute_factor)
    return gen, Triplets(world, zoo, gen, "text", CFG, text=StubText(), seed=1)


@pytest.fixture(scope="module")
def trained(world_data, tmp_path_factory):
    """{start: (model, history)} trained from the mean LoRA and from ΔW = 0."""
    _, data = world_data
    cfg = preset(TextToLoraConfig, "smoke", {"dropout": 0.0})
    return {start: train_text_to_lora(data, dataclasses.replace(cfg, start=start), TRAIN,
                                      tmp_path_factory.mktemp(f"t2l-{start}"), progress=False)
            for start in ("zero", "mean")}


def test_the_targets_have_several_shapes_and_a_head_each(world_data):
    _, data = world_data
    shapes = {t.shape for t in data.spec.targets}
    assert {(64, 64), (128, 64), (64, 128)} <= shapes
    model = TextToLora(TextToLoraConfig(hidden=16, task_dim=8, embed_dim=4).for_data(data), data.spec)
    assert len(model.heads) == len(data.spec.type_names)  # each module type has one shape here


def test_it_learns_the_zoo(trained):
    """From ΔW = 0 the reconstruction loss falls clearly; from the mean LoRA it falls below the mean's."""
    for start, factor in (("zero", 0.7), ("mean", 0.9)):
        loss = [h["loss"] for h in trained[start][1]]
        assert len(loss) == STEPS
        first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
        assert last < factor * first, (start, first, last)


def test_the_condition_matters(world_data, trained):
    """Two conditions give two LoRAs, and each train case's LoRA is closer to its own zoo LoRA than to another
    case's: the model reads the condition, not only the mean."""
    _, data = world_data
    model = trained["mean"][0]
    ids = data.train_ids
    loras = predict_cases(model, data.conditions("train"), ids)
    a, b = loras[ids[0]], loras[ids[-1]]
    assert set(a) == set(data.spec.names)
    name = data.spec.names[0]
    assert not torch.allclose(delta((a[name].A[None], a[name].B[None], a[name].alpha)),
                              delta((b[name].A[None], b[name].B[None], b[name].alpha)))
    own = delta_l1_per_case(data, ids, [loras[c] for c in ids]).mean()
    other = delta_l1_per_case(data, ids, [loras[c] for c in ids[1:] + ids[:1]]).mean()
    assert own < 0.9 * other, (own, other)


def test_the_lora_loads_into_the_base_through_diffusers(world_data, trained, tmp_path, key_warnings):  # noqa: F811
    gen, data = world_data
    tokens, mask = data.conditions("eval").get(data.heldout_ids[:1])
    lora = trained["zero"][0].predict(tokens, mask)
    assert {n: (f.B.shape[0], f.A.shape[1]) for n, f in lora.items()} == {t.name: t.shape for t in data.spec.targets}
    save_lora(tmp_path / "t2l.safetensors", lora)
    adapted = copy.deepcopy(gen.net)
    adapted.load_lora_adapter(load_file(tmp_path / "t2l.safetensors"), prefix="transformer", adapter_name="x")
    check_loaded(gen.net, adapted, lora, key_warnings)


def test_save_and_load_give_the_same_predictions(world_data, trained, tmp_path):
    _, data = world_data
    model = trained["mean"][0]
    model.save_pretrained(tmp_path / "m")
    loaded = TextToLora.from_pretrained(tmp_path / "m")
    assert loaded.cfg == model.cfg and loaded.spec == model.spec
    tokens, mask = data.conditions("eval").get(data.heldout_ids)
    for x, y in zip(model.predict_batch(tokens, mask), loaded.predict_batch(tokens, mask)):
        for name in x:
            assert torch.equal(x[name].A, y[name].A) and torch.equal(x[name].B, y[name].B)
            assert x[name].alpha == y[name].alpha
    with pytest.raises(LofaError, match="no Text-to-LoRA model"):
        TextToLora.from_pretrained(tmp_path)


def test_a_start_is_exact_and_unet_shapes_work():
    """Untrained: start 'zero' predicts ΔW = 0 and `set_start` predicts its factors exactly, for UNet-style targets
    of several widths (64x64 self-attention, 64x384 cross-attention keys, 128x128 in a deeper block)."""
    blocks = ("down_blocks.1.attentions.0.transformer_blocks.0", "down_blocks.2.attentions.0.transformer_blocks.0")
    shapes = {f"{blocks[0]}.attn1.to_q": (64, 64), f"{blocks[0]}.attn2.to_k": (64, 384),
              f"{blocks[1]}.attn1.to_q": (128, 128), f"{blocks[1]}.attn2.to_k": (128, 384)}
    spec = TargetSpec.from_shapes(shapes)
    cfg = TextToLoraConfig(cond_dim=8, rank=2, alpha=4.0, task_dim=8, embed_dim=4, hidden=16, depth=1,
                           start="zero")
    torch.manual_seed(0)
    model = TextToLora(cfg, spec)
    assert len(model.heads) == 4  # one per (module type, shape)
    tokens, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    out = model(tokens, mask)
    for t in spec.targets:
        A, B, alpha = out[t.name]
        assert A.shape == (3, 2, t.shape[1]) and B.shape == (3, t.shape[0], 2) and alpha == 4.0
        assert not B.any() and A.abs().sum() > 0
    g = torch.Generator().manual_seed(1)
    start = {i: (torch.randn(2, t.shape[1], generator=g), torch.randn(t.shape[0], 2, generator=g))
             for i, t in enumerate(spec.targets)}
    model.set_start(start)
    for lora in model.predict_batch(tokens, mask):
        for i, t in enumerate(spec.targets):
            assert torch.equal(lora[t.name].A, start[i][0]) and torch.equal(lora[t.name].B, start[i][1])


def test_a_condition_of_the_wrong_width_is_a_one_line_error(trained):
    model = trained["zero"][0]
    for tokens in (torch.randn(2, 5, StubText.dim + 1), torch.randn(StubText.dim)):
        with pytest.raises(LofaError) as err:
            model.predict_batch(tokens)
        assert "\n" not in str(err.value)
    with pytest.raises(LofaError, match="width 9"):
        model.predict_batch(torch.randn(1, 5, StubText.dim + 1))
    with pytest.raises(LofaError, match="unknown Text-to-LoRA start"):
        TextToLoraConfig(start="mode")
