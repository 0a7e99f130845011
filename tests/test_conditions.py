"""Conditions are handled as stated: prompts (cut with a warning, empty refused), images (any mode and bit depth,
fitted to the encoder's resolution by one rule), pose arrays (shape, dtype and range checked), through the Python
API and `lofa predict`."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lofa.cli import main
from lofa.errors import LofaError
from lofa.hypernet import LoFA, save_pretrained
from lofa.models.cond_encoders import (CondEncoderConfig, check_pose, encoder_for_world, image_to_condition,
                                       load_condition_encoder, make_condition_encoder, read_condition)
from lofa.models.text import TextEncoder, _load

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_SHAPE, POSE_SHAPE = (3, 16, 16), (3, 8, 16, 16)


# --- prompts -----------------------------------------------------------------------------------------------------
def reference_encoding(prompt, max_length):
    """What TextEncoder computed before prompts were measured: truncate, encode, zero the padding."""
    tokenizer, model = _load(torch.device("cpu"))
    batch = tokenizer([prompt], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].bool()
    return states * mask.unsqueeze(-1), mask


def test_prompts_that_fit_encode_bit_identically_and_silently():
    prompt = "a person waves the left arm quickly"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        states, mask = TextEncoder("cpu").encode([prompt, ""])
    ref_states, ref_mask = reference_encoding(prompt, 32)
    assert torch.equal(states[:1], ref_states) and torch.equal(mask[:1], ref_mask)
    assert states.shape == (2, 32, 384) and mask[1].sum() == 2  # "" is [CLS] [SEP]: the unconditional caption


def test_a_long_prompt_is_cut_with_one_warning_naming_the_cut():
    tokenizer, _ = _load(torch.device("cpu"))
    prompt = "a person kicks to the side with the left leg and then " * 40
    n = len(tokenizer(prompt, verbose=False)["input_ids"])
    with pytest.warns(UserWarning) as caught:
        states, _ = TextEncoder("cpu").encode([prompt])
    messages = [str(w.message) for w in caught if "tokens" in str(w.message)]
    assert len(messages) == 1
    assert f"has {n} tokens" in messages[0] and f"the last {n - 32} tokens are cut" in messages[0]
    assert torch.equal(states, reference_encoding(prompt, 32)[0])  # the same numbers as before: only the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextEncoder("cpu").encode([prompt])  # once per prompt in a process, even from another encoder
    with pytest.warns(UserWarning, match=f"the last {n - 64} tokens"):
        TextEncoder("cpu", max_length=64).encode([prompt])


# --- images ------------------------------------------------------------------------------------------------------
def test_every_mode_and_bit_depth_becomes_rgb_in_minus_one_one():
    grey16 = np.full((6, 6), 1000, dtype=np.uint16)
    cases = {  # image -> the expected value of every pixel, per channel
        "L": (Image.new("L", (6, 6), 51), [51 / 255] * 3),
        "RGB": (Image.new("RGB", (6, 6), (255, 0, 51)), [1.0, 0.0, 0.2]),
        "RGBA opaque": (Image.new("RGBA", (6, 6), (255, 0, 51, 255)), [1.0, 0.0, 0.2]),
        "RGBA transparent": (Image.new("RGBA", (6, 6), (255, 255, 255, 0)), [0.0] * 3),  # onto black
        "LA half": (Image.new("LA", (6, 6), (255, 102)), [0.4] * 3),
        "I;16": (Image.fromarray(grey16), [1000 / 65535] * 3),  # not clipped to white
        "I": (Image.fromarray(grey16.astype(np.int32)), [1000 / 65535] * 3),
        "F": (Image.fromarray(np.full((6, 6), 0.25, dtype=np.float32)), [0.25] * 3),
        "1": (Image.new("1", (6, 6), 1), [1.0] * 3),
    }
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 255, 51, 0] + [0] * 762)
    cases["P"] = (palette, [1.0, 0.2, 0.0])
    for name, (image, expected) in cases.items():
        x = image_to_condition(image, None)
        assert x.shape == (3, 6, 6) and x.dtype == torch.float32, name
        want = torch.tensor(expected).view(3, 1, 1).expand(3, 6, 6) * 2 - 1
        torch.testing.assert_close(x, want, atol=1e-6, rtol=0, msg=name)


def test_sixteen_bit_png_file_keeps_its_range(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 100).astype(np.uint16)  # 0 .. 25500
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    x = read_condition(tmp_path / "deep.png", CondEncoderConfig(kind="image", input_shape=IMAGE_SHAPE))
    torch.testing.assert_close(x[0], torch.from_numpy(ramp / 65535 * 2 - 1).float(), atol=1e-6, rtol=0)
    assert x.max() < -0.2  # the brightest pixel is 39 % grey, not white


def test_images_are_centre_cropped_and_resized_to_the_encoder_resolution():
    # 40 x 20: red | green (the centred 20 x 20 square) | blue
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :10] = (255, 0, 0)
    wide[:, 10:30] = (0, 255, 0)
    wide[:, 30:] = (0, 0, 255)
    x = image_to_condition(Image.fromarray(wide), (16, 16))
    assert x.shape == (3, 16, 16)
    inner = x[:, 2:-2, 2:-2]
    assert torch.all(inner[1] > 0.95) and torch.all(inner[0] < -0.95) and torch.all(inner[2] < -0.95)
    for size in ((5, 3), (1000, 700), (700, 1000)):
        y = image_to_condition(Image.new("RGB", size, (10, 200, 30)), (16, 16))
        assert y.shape == (3, 16, 16) and y.min() >= -1 and y.max() <= 1
        torch.testing.assert_close(y[:, 8, 8], torch.tensor([10, 200, 30]) / 127.5 - 1, atol=1e-5, rtol=0)


def test_unreadable_or_out_of_range_images_are_refused(tmp_path):
    config = CondEncoderConfig(kind="image", input_shape=IMAGE_SHAPE)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for path, message in ((tmp_path / "broken.png", "not a readable image"), (tmp_path / "none.png", "no such file"),
                          (tmp_path / "pose.npy", "conditioned on image")):
        if path.name == "pose.npy":
            np.save(path, np.zeros(POSE_SHAPE, dtype=np.float32))
        with pytest.raises(LofaError, match=message):
            read_condition(path, config)
    with pytest.raises(LofaError, match=r"grey levels are read in \[0, 1\]"):
        image_to_condition(Image.fromarray(np.full((4, 4), 3.0, dtype=np.float32)), None)


# --- poses -------------------------------------------------------------------------------------------------------
def test_pose_arrays_are_checked_for_shape_dtype_and_range():
    good = torch.rand(POSE_SHAPE) * 2 - 1
    assert torch.equal(check_pose(good, POSE_SHAPE), good)
    assert torch.equal(check_pose(good[None], POSE_SHAPE), good)
    assert check_pose(good.double(), POSE_SHAPE).dtype == torch.float32
    bad = {
        "uint8 0-255": ((good * 127.5 + 127.5).to(torch.uint8), r"dtype uint8 .* x / 127\.5 - 1"),
        "too large": (torch.zeros(3, 64, 128, 128), r"pose encoder takes \[3, 8, 16, 16\]"),
        "channels last": (good.permute(1, 2, 3, 0), "channels go first"),
        "one frame": (good[:, 0], r"expected \[3, T, H, W\] float in \[-1, 1\]"),
        "0-255 floats": (good * 127.5 + 127.5, r"values lie in \[.*\]; expected \[3, T, H, W\]"),
        "nan": (torch.full(POSE_SHAPE, float("nan")), "NaN"),
    }
    for name, (x, message) in bad.items():
        with pytest.raises(LofaError, match=message):
            check_pose(x, POSE_SHAPE)


# --- encoders record their resolution ----------------------------------------------------------------------------
def test_encoders_record_their_input_shape_and_old_ones_still_load(tmp_path):
    from lofa.worlds import make_world

    for task, shape in (("actions", POSE_SHAPE), ("styles", IMAGE_SHAPE), ("identities", IMAGE_SHAPE)):
        world = make_world(task, "smoke")
        torch.manual_seed(0)
        encoder = encoder_for_world(world, "smoke")
        assert encoder.config.input_shape == shape == tuple(world.condition([0], seed=3).shape[1:])
        torch.manual_seed(0)  # recording the shape changes no weight: the pipeline's encoders train as before
        unrecorded = make_condition_encoder(dataclasses.replace(encoder.config, input_shape=None))
        assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(),
                                                     unrecorded.state_dict().values()))
        encoder.save(tmp_path / f"{task}.safetensors")
        assert load_condition_encoder(tmp_path / f"{task}.safetensors").config.input_shape == shape
    old = make_condition_encoder(CondEncoderConfig(kind="image", channels=(4,), dim=8, proj_dim=4))
    old.save(tmp_path / "old.safetensors")
    assert load_condition_encoder(tmp_path / "old.safetensors").config.input_shape is None
    with pytest.warns(UserWarning, match="records no input resolution"):
        x = read_condition(Image.new("RGB", (7, 5)), old.config)
    assert x.shape == (3, 5, 7)


# --- through LoFA and `lofa predict` -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny text, image and pose checkpoints over one UNet-like base saved as a safetensors file."""
    from test_hypernet import mixed_base, random_stage2, tiny_cfg

    root = tmp_path_factory.mktemp("ckpts")
    spec, weights, _ = mixed_base()
    save_file({f"{n}.weight": w.contiguous() for n, w in weights.items()}, root / "base.safetensors")
    encoders = {"text": {"kind": "text", "max_length": 8},
                "image": make_condition_encoder(CondEncoderConfig(kind="image", channels=(4, 8), dim=12,
                                                                  proj_dim=4, input_shape=IMAGE_SHAPE)),
                "pose": make_condition_encoder(CondEncoderConfig(kind="pose", channels=(4, 8), dim=12,
                                                                 proj_dim=4, grid=(2, 2, 2),
                                                                 input_shape=POSE_SHAPE))}
    for kind, encoder in encoders.items():
        cond_dim = 384 if kind == "text" else 12
        _, s2 = random_stage2(tiny_cfg(cond_dim=cond_dim), spec)
        save_pretrained(root / kind, s2, None, condition_encoder=encoder, base="../base.safetensors")
    return root


def test_lofa_encodes_images_by_the_rule_and_refuses_bad_conditions(checkpoints, tmp_path):
    model = LoFA.from_pretrained(checkpoints / "image")
    assert model.condition_kind == "image"
    photo = Image.new("RGBA", (1000, 700), (200, 40, 90, 255))
    photo.save(tmp_path / "ref.png")
    tokens, mask = model.encode_condition(image=str(tmp_path / "ref.png"))
    encoder = load_condition_encoder(checkpoints / "image" / "condition_encoder.safetensors")
    expected, _ = encoder.encode(image_to_condition(photo, IMAGE_SHAPE[1:])[None])
    assert tokens.shape == (1, 16, 12) and mask.all()
    torch.testing.assert_close(tokens, expected)
    with pytest.raises(LofaError, match="conditioned on image, not text: pass --image"):
        model.encode_condition(prompt="a style")
    text = LoFA.from_pretrained(checkpoints / "text")
    for blank in ("", "   \n"):
        with pytest.raises(LofaError, match="the prompt is empty"):
            text.encode_condition(prompt=blank)
    pose = LoFA.from_pretrained(checkpoints / "pose")
    assert pose.encode_condition(pose=torch.zeros(POSE_SHAPE))[0].shape == (1, 8, 12)
    with pytest.raises(LofaError, match="dtype uint8"):
        pose.encode_condition(pose=torch.zeros(POSE_SHAPE, dtype=torch.uint8))


def run_predict(capsys, checkpoint, *condition, out):
    code = main(["predict", "--checkpoint", str(checkpoint), *condition, "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lofa_predict_bad_conditions_exit_2_in_one_line_and_write_nothing(checkpoints, tmp_path, capsys):
    np.save(tmp_path / "pose_uint8.npy", np.zeros(POSE_SHAPE, dtype=np.uint8))
    np.save(tmp_path / "pose_big.npy", np.zeros((3, 64, 128, 128), dtype=np.float32))
    (tmp_path / "not_an_image.png").write_text("hello")
    out = tmp_path / "lora.safetensors"
    cases = [
        ("text", ["--prompt", ""], "the prompt is empty"),
        ("text", ["--prompt", "   "], "the prompt is empty"),
        ("text", ["--image", str(tmp_path / "x.png")], "conditioned on text, not image: pass --prompt"),
        ("pose", ["--pose", str(tmp_path / "pose_uint8.npy")], "dtype uint8"),
        ("pose", ["--pose", str(tmp_path / "pose_big.npy")], "pose encoder takes [3, 8, 16, 16]"),
        ("pose", ["--pose", str(tmp_path / "missing.npy")], "no such file"),
        ("image", ["--image", str(tmp_path / "not_an_image.png")], "not a readable image"),
        ("image", ["--image", str(tmp_path / "pose_big.npy")], "conditioned on image"),
        ("nothing-here", ["--prompt", "a kick"], "no such folder"),
    ]
    for kind, condition, message in cases:
        code, printed, err = run_predict(capsys, checkpoints / kind, *condition, out=out)
        assert code == 2 and message in err, (kind, condition, err)
        assert err.count("\n") == 1 and err.startswith("lofa predict: error: ") and "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    for bad_out, message in ((tmp_path / "lora.bin", "ending in .safetensors"),
                             (tmp_path / "nowhere" / "l.safetensors", "does not exist")):
        code, _, err = run_predict(capsys, checkpoints / "text", "--prompt", "a kick", out=bad_out)
        assert code == 2 and message in err and err.count("\n") == 1


def test_lofa_predict_accepts_good_conditions_of_every_kind(checkpoints, tmp_path, capsys):
    from lofa.lora.formats import load_lora

    Image.new("LA", (30, 20), (128, 255)).save(tmp_path / "face.png")
    np.save(tmp_path / "pose.npy", np.zeros(POSE_SHAPE, dtype=np.float32))
    for kind, condition in (("text", ["--prompt", "a kick"]), ("image", ["--image", str(tmp_path / "face.png")]),
                            ("pose", ["--pose", str(tmp_path / "pose.npy")])):
        out = tmp_path / f"{kind}.safetensors"
        code, printed, err = run_predict(capsys, checkpoints / kind, *condition, out=out)
        assert code == 0 and f"wrote {out}" in printed, err
        lora, meta = load_lora(out)
        assert len(lora) == 6 and meta["source"] == "lofa predict"
    long_prompt = "a person kicks to the side with the left leg, slowly, twice, then turns around and bows"
    code, _, err = run_predict(capsys, checkpoints / "text", "--prompt", long_prompt, out=tmp_path / "long.safetensors")
    assert code == 0 and err.startswith("lofa: warning: prompt") and "tokens are cut" in err and err.count("\n") == 1
