import dataclasses

import pytest
import torch
from peft import LoraConfig

from lofa.models import Generator, TextEncoder

SHAPES = {"video_dit": (2, 3, 4, 16, 16), "image_unet": (2, 3, 16, 16)}


@pytest.fixture(scope="module", params=["video_dit", "image_unet"])
def gen(request):
    torch.manual_seed(0)
    g = Generator.build(request.param, "smoke", {"zero_init_output": False})
    return g.eval()


def _inputs(gen, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPES[gen.kind], generator=g)
    context = torch.randn(2, 6, gen.context_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    return x, torch.tensor([0.3, 0.8]), context, mask


def test_forward_shape(gen):
    x, t, context, mask = _inputs(gen)
    v = gen(x, t, context, mask)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert torch.allclose(gen(x, 0.5, context, mask), gen(x, torch.tensor([0.5, 0.5]), context, mask))


def test_x0_prediction_is_turned_into_velocity(gen):
    x, t, context, mask = _inputs(gen)
    assert gen.config.prediction == "x0"
    video = gen.kind == "video_dit"  # the wrapper zeroes padded text positions for Wan, masks them for the UNet
    kwargs = {} if video else {"encoder_attention_mask": mask}
    with torch.no_grad():
        x0_hat = gen.net(x, t * 1000, context * mask[..., None] if video else context, **kwargs, return_dict=False)[0]
        expected = (x - x0_hat) / t.view(-1, *([1] * (x.ndim - 1)))
        assert torch.allclose(gen(x, t, context, mask), expected, atol=1e-5)


def test_mask_ignores_padded_tokens(gen):
    x, t, context, mask = _inputs(gen)
    changed = context.clone()
    changed[~mask] = 100.0
    with torch.no_grad():
        assert torch.allclose(gen(x, t, context, mask), gen(x, t, changed, mask), atol=1e-5)
        changed_real = context.clone()
        changed_real[0, 0] += 3.0
        assert not torch.allclose(gen(x, t, context, mask)[0], gen(x, t, changed_real, mask)[0], atol=1e-4)


def test_save_load_round_trip(gen, tmp_path):
    x, t, context, mask = _inputs(gen)
    gen.save(tmp_path / "g")
    gen.save(tmp_path / "g")  # overwriting an existing save is atomic and leaves no temp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    loaded = Generator.load(tmp_path / "g").eval()
    assert loaded.kind == gen.kind and loaded.config == gen.config
    assert loaded.t_distribution == gen.t_distribution
    with torch.no_grad():
        assert torch.equal(gen(x, t, context, mask), loaded(x, t, context, mask))


@pytest.mark.parametrize("times", [(0.3, 1.2), (0.8, 0.8), "uniform"], ids=["logit_normal", "default", "uniform"])
def test_a_generator_keeps_its_t_distribution_through_save_and_load(times, tmp_path):
    from lofa.diffusion import TimeDistribution

    wanted = TimeDistribution(mode="uniform") if times == "uniform" else TimeDistribution(mean=times[0], std=times[1])
    g = Generator.build("image_unet", "smoke", t_distribution=wanted)
    assert Generator.build("image_unet", "smoke").t_distribution == TimeDistribution()  # BaseTrainConfig's default
    g.save(tmp_path / "g")
    assert Generator.load(tmp_path / "g").t_distribution == wanted


def test_a_generator_folder_without_its_t_distribution_is_a_one_line_error(tmp_path):
    import json

    from lofa.errors import LofaError
    from lofa.models.generator import CONFIG_FILE

    Generator.build("image_unet", "smoke").save(tmp_path / "g")
    meta_path = tmp_path / "g" / CONFIG_FILE
    meta = json.loads(meta_path.read_text())
    del meta["t_distribution"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LofaError) as err:
        Generator.load(tmp_path / "g")
    message = str(err.value)
    assert "\n" not in message and str(meta_path) in message and '"t_distribution"' in message


def test_lora_targets_exist_and_peft_attaches(gen):
    names = gen.lora_target_modules()
    modules = dict(gen.net.named_modules())
    assert names and all(isinstance(modules[n], torch.nn.Linear) for n in names)
    per_block = {n.rsplit(".attn", 1)[0] for n in names}
    assert len(names) == 8 * len(per_block)  # q, k, v, o of self- and cross-attention in every block
    with_ffn = gen.lora_target_modules(include_ffn=True)
    assert set(names) < set(with_ffn) and len(with_ffn) == 10 * len(per_block)

    g = Generator.from_config(gen.config).eval()
    g.net.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=names, init_lora_weights="gaussian"))
    lora = [n for n, _ in g.net.named_parameters() if "lora_A" in n]
    assert len(lora) == len(names)
    x, t, context, mask = _inputs(g)
    assert g(x, t, context, mask).shape == x.shape
    assert g.lora_target_modules() == names  # names are stable after injection


def test_fast_rope_processor_matches_diffusers():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    g = Generator.build("video_dit", "smoke", {"zero_init_output": False})
    x, t, context, mask = _inputs(g)
    fast = g(x, t, context, mask)
    g.net.set_attn_processor(WanAttnProcessor())
    assert torch.allclose(fast, g(x, t, context, mask), atol=1e-5)


@pytest.mark.parametrize("positions", [0, 3])
def test_position_channels_give_tokens_their_place(positions, tmp_path):
    # RoPE is relative: on a uniform input every token sees the same thing and the DiT paints every patch alike;
    # (t, y, x) input planes are the only absolute position signal
    torch.manual_seed(0)
    g = Generator.build("video_dit", "smoke", {"zero_init_output": False, "position_channels": positions}).eval()
    assert g.net.config.in_channels == 3 + positions and g.net.config.out_channels == 3
    x = torch.full((1, 3, 4, 16, 16), 0.2)
    _, t, context, _ = _inputs(g)
    with torch.no_grad():
        v = g(x, t[:1], context[:1])
    pt, ph, pw = g.config.patch_size
    patches = v.unfold(2, pt, pt).unfold(3, ph, ph).unfold(4, pw, pw).reshape(1, 3, -1, pt * ph * pw)
    spread = (patches - patches[:, :, :1]).abs().max().item()
    assert (spread > 1e-3) == bool(positions), spread
    g.save(tmp_path / "g")
    loaded = Generator.load(tmp_path / "g").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t[:1], context[:1]), v)


def test_wan_preset_is_wan21_1_3b():
    from lofa.config import preset
    from lofa.models import VideoDiTConfig

    cfg = preset(VideoDiTConfig, "wan")
    assert (cfg.num_layers, cfg.width, cfg.ffn_dim, cfg.text_dim, cfg.in_channels) == (30, 1536, 8960, 4096, 16)


def test_from_pretrained_wan_local_folder(tmp_path):
    g = Generator.build("video_dit", "smoke")
    g.net.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = Generator.from_pretrained_wan(tmp_path / "pipe")
    assert loaded.config.prediction == "velocity"  # Wan checkpoints predict the velocity
    assert loaded.t_distribution.record() == {"t_sampling": "logit_normal", "t_mean": 0.0, "t_std": 1.0}
    # a plain diffusers folder (no lofa json) loads as a Wan transformer, with Wan's t distribution
    assert Generator.load(tmp_path / "pipe" / "transformer").t_distribution == loaded.t_distribution
    assert dataclasses.replace(loaded.config, zero_init_output=True, prediction="x0") == g.config
    assert loaded.lora_target_modules() == g.lora_target_modules()
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), loaded.state_dict().values()))


def test_text_encoder():
    enc = TextEncoder(max_length=16)
    states, mask = enc.encode(["a person waving the left arm", "a red square", "a person waving the left arm"])
    assert states.shape == (3, 16, 384) and mask.shape == (3, 16) and mask.dtype == torch.bool
    assert torch.equal(states[0], states[2])
    assert not torch.allclose(states[0], states[1])
    assert (states[~mask] == 0).all() and mask[:, 0].all()
    # a fresh encoder shares the loaded model, and a prompt's states do not depend on the prompts asked with it
    again, _ = TextEncoder(max_length=8).encode(["a red square"])
    crowd, _ = TextEncoder(max_length=8).encode(["a person waving", "a red square", "one bar", "two bars"])
    assert torch.equal(again[0], crowd[1]) and torch.equal(TextEncoder(max_length=16).encode(["a red square"])[0][0],
                                                           states[1])


class Interrupted(Exception):
    pass


class FakeWorld:
    """Minimal World API: cases are coloured squares; coarse category = square vs bar."""

    task, modality, coarse_names = "actions", "video", ["square", "bar"]

    def __init__(self, n=6, fail_at_seed=None):
        from types import SimpleNamespace

        self.cases = [SimpleNamespace(id=i, coarse=i % 2, split="train" if i < 4 else "heldout") for i in range(n)]
        self.fail_at_seed = fail_at_seed

    def ids(self, split):
        return [c.id for c in self.cases if c.split == split]

    def coarse_prompt(self, coarse, variant=0):
        return ["a {}", "one {}"][variant % 2].format(self.coarse_names[coarse])

    def render(self, case_ids, seed):
        if seed == self.fail_at_seed:
            raise Interrupted
        g = torch.Generator().manual_seed(seed)
        x = -torch.ones(len(case_ids), 3, 4, 16, 16)
        for k, i in enumerate(case_ids):
            y, w = torch.randint(0, 8, (2,), generator=g).tolist()
            x[k, i % 3, :, y:y + 8, w:w + (8 if i % 2 == 0 else 3)] = 1.0
        return x

    def sample(self, case_ids, seed, level="fine"):
        assert level == "coarse"
        return self.render(case_ids, seed), [self.coarse_prompt(self.cases[i].coarse, seed) for i in case_ids]

    def condition(self, case_ids, seed):
        return self.render(case_ids, seed + 1000)  # not any render seed world_pairs draws


def _base_cfg(**kw):
    from lofa.config import preset
    from lofa.models.train_base import BaseTrainConfig

    fields = {"steps": 6, "batch_size": 2, "checkpoint_every": 3, "ema_decay": 0.9, "text_length": 8, "model_overrides": {"patch_size": (1, 4, 4)}}
    return preset(BaseTrainConfig, "smoke", {**fields, **kw})


def test_train_base_resumes_to_identical_weights(tmp_path):
    from lofa.io import read_json
    from lofa.models.train_base import train_base

    straight = train_base(FakeWorld(), _base_cfg(), tmp_path / "a", progress=False)
    summary = read_json(tmp_path / "a" / "summary.json")
    assert summary["train_cases"] == 4 and len(read_json(tmp_path / "a" / "loss.json")["loss"]) == 6

    with pytest.raises(Interrupted):  # dies at step 4, after the checkpoint at step 3
        train_base(FakeWorld(fail_at_seed=4), _base_cfg(), tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "checkpoints" / "latest.json").exists() and not (tmp_path / "b" / "generator").exists()
    resumed = train_base(FakeWorld(), _base_cfg(), tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "checkpoints").exists()
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    again = train_base(FakeWorld(fail_at_seed=0), _base_cfg(), tmp_path / "a", progress=False)  # complete: loads
    assert torch.equal(next(again.parameters()), next(straight.parameters()))
    assert straight.t_distribution == again.t_distribution == _base_cfg().t_distribution


def test_a_base_saved_in_bfloat16_is_half_the_size_and_the_run_goes_on_with_what_was_saved(tmp_path):
    from safetensors import safe_open

    from lofa.errors import LofaError
    from lofa.models.train_base import is_complete, record, train_base

    full = train_base(FakeWorld(), _base_cfg(), tmp_path / "a", progress=False)
    half = train_base(FakeWorld(), _base_cfg(save_dtype="bfloat16"), tmp_path / "b", progress=False)
    name = "generator/diffusion_pytorch_model.safetensors"
    with safe_open(str(tmp_path / "b" / name), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (tmp_path / "b" / name).stat().st_size < 0.6 * (tmp_path / "a" / name).stat().st_size
    loaded = Generator.load(tmp_path / "b" / "generator")
    for (key, a), b, c in zip(half.state_dict().items(), loaded.state_dict().values(), full.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), key  # the returned base is what was saved
        assert torch.equal(a, c.to(torch.bfloat16).float()), key  # the same training, rounded once at the end
    # the default leaves the record as it was before the field existed (the shipped mini bases still match)
    assert "save_dtype" not in record(_base_cfg()) and record(_base_cfg(save_dtype="bfloat16"))["save_dtype"]
    assert is_complete(tmp_path / "b", _base_cfg(save_dtype="bfloat16"), 0)
    assert not is_complete(tmp_path / "b", _base_cfg(), 0)
    with pytest.raises(LofaError, match="unknown save_dtype"):
        _base_cfg(save_dtype="int8")


def test_train_base_gives_the_generator_its_configs_t_distribution(tmp_path):
    from lofa.diffusion import TimeDistribution
    from lofa.models.train_base import train_base

    cfg = _base_cfg(steps=1, t_mean=-0.5, t_std=1.5)
    gen = train_base(FakeWorld(), cfg, tmp_path / "a", progress=False)
    assert gen.t_distribution == TimeDistribution(mode="logit_normal", mean=-0.5, std=1.5)
    assert Generator.load(tmp_path / "a" / "generator").t_distribution == gen.t_distribution


def test_condition_encoders_shapes_and_save(tmp_path):
    from lofa.models.cond_encoders import CondEncoderConfig, load_condition_encoder, make_condition_encoder

    pose = make_condition_encoder(CondEncoderConfig(kind="pose", grid=(2, 2, 2), channels=(8, 16), dim=24))
    tokens, mask = pose.encode(torch.randn(3, 3, 8, 32, 32))
    assert tokens.shape == (3, 8, 24) and mask.shape == (3, 8) and mask.all()
    image = make_condition_encoder(CondEncoderConfig(kind="image", grid=(3, 3), channels=(8, 16), dim=24)).eval()
    x = torch.randn(3, 3, 32, 32)
    assert image.encode(x)[0].shape == (3, 9, 24)
    image.save(tmp_path / "enc.safetensors")
    with torch.no_grad():
        assert torch.equal(load_condition_encoder(tmp_path / "enc.safetensors")(x), image(x))


def test_world_pairs_views():
    from lofa.models.cond_encoders import world_pairs

    a, b = world_pairs(FakeWorld())([0, 1, 2], seed=3)
    assert a.shape == b.shape == (3, 3, 4, 16, 16) and not torch.equal(a, b)  # pose vs render of the case


def test_contrastive_training_learns_case_identity():
    from lofa.models.cond_encoders import CondEncoderConfig, make_condition_encoder, train_condition_encoder

    patterns = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def pairs(ids, seed):  # two noisy, shifted views of each case's pattern
        g = torch.Generator().manual_seed(seed)
        view = lambda: torch.roll(patterns[ids], int(torch.randint(-2, 3, (), generator=g)), -1) + 0.3 * torch.randn(  # noqa: E731
            len(ids), 3, 16, 16, generator=g)
        return view(), view()

    torch.manual_seed(0)
    enc = make_condition_encoder(CondEncoderConfig(kind="image", grid=(2, 2), channels=(8, 16), dim=16, proj_dim=16))
    hist = train_condition_encoder(enc, pairs, list(range(16)), steps=40, batch_size=16, lr=3e-3,
                                   eval_ids=list(range(16)), progress=False)
    assert sum(hist["loss"][-5:]) / 5 < 0.7 * sum(hist["loss"][:5]) / 5
    assert hist["retrieval"]["after"] >= hist["retrieval"]["before"] + 0.25  # chance: 1 / 16


def test_task_overrides_change_one_worlds_base_only(tmp_path):
    from lofa.errors import LofaError
    from lofa.io import read_json
    from lofa.models.train_base import train_base

    special = {"steps": 4, "model_overrides": {"patch_size": (1, 4, 4), "position_channels": 3}}
    cfg = _base_cfg(task_overrides={FakeWorld.task: special})
    gen = train_base(FakeWorld(), cfg, tmp_path / "a", progress=False)
    assert gen.config.position_channels == 3 and len(read_json(tmp_path / "a" / "loss.json")["loss"]) == 4
    assert read_json(tmp_path / "a" / "summary.json")["config"]["task_overrides"] == {}
    assert train_base(FakeWorld(), cfg, tmp_path / "a", progress=False).config.position_channels == 3  # loads
    other = _base_cfg(task_overrides={"some_other_task": special})
    assert other.for_task(FakeWorld.task) == dataclasses.replace(other, task_overrides={})
    with pytest.raises(LofaError, match="unknown field"):
        _base_cfg(task_overrides={FakeWorld.task: {"stepz": 4}}).for_task(FakeWorld.task)


@pytest.mark.parametrize("kind", ["video_dit", "image_unet"])
def test_gradient_checkpointing_agrees_under_functional_call(kind):
    """A predicted LoRA enters the base through functional_call; checkpointing on and off give one gradient."""
    from torch.func import functional_call

    from lofa.lora.formats import LoraFactor
    from lofa.lora.train import merged_weights

    torch.manual_seed(0)
    gen = Generator.build(kind, "smoke").eval().requires_grad_(False)
    for p in gen.parameters():  # the smoke models start with a zero output layer: no gradient would reach the LoRA
        torch.nn.init.normal_(p, std=0.05)
    names = gen.lora_target_modules()[:6]
    factors = {n: (torch.randn(2, gen.net.get_submodule(n).weight.shape[1]) * 0.1,
                   torch.randn(gen.net.get_submodule(n).weight.shape[0], 2) * 0.1) for n in names}
    shape = (2, 3, 4, 16, 16) if kind == "video_dit" else (2, 3, 16, 16)
    x, context = torch.randn(shape), torch.randn(2, 5, gen.context_dim)

    def grads(checkpointing: bool):
        gen.net.disable_gradient_checkpointing()
        if checkpointing:
            gen.enable_gradient_checkpointing()
        leaves = {n: (a.clone().requires_grad_(), b.clone().requires_grad_()) for n, (a, b) in factors.items()}
        weights = merged_weights(gen, {n: LoraFactor(a, b, 2.0) for n, (a, b) in leaves.items()})
        out = functional_call(gen, weights, (x, torch.tensor([0.3, 0.7]), context))
        out.square().mean().backward()
        return torch.cat([t.grad.flatten() for pair in leaves.values() for t in pair])

    plain, recomputed = grads(False), grads(True)
    assert plain.abs().max() > 0
    assert torch.allclose(plain, recomputed, rtol=1e-4, atol=1e-7)


def test_a_train_base_folder_written_before_t_distribution_takes_the_one_its_summary_records(tmp_path):
    import json

    from lofa.diffusion import TimeDistribution
    from lofa.models.generator import CONFIG_FILE

    Generator.build("image_unet", "smoke").save(tmp_path / "base" / "generator")
    meta_path = tmp_path / "base" / "generator" / CONFIG_FILE
    meta = json.loads(meta_path.read_text())
    del meta["t_distribution"]
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "base" / "summary.json").write_text(json.dumps(
        {"config": {"t_sampling": "logit_normal", "t_mean": 0.3, "t_std": 1.1, "steps": 10}}))
    assert Generator.load(tmp_path / "base" / "generator").t_distribution == TimeDistribution(mean=0.3, std=1.1)
