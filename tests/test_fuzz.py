"""Fuzzed outside input (hypothesis): every reader of what a user hands lofa either reads it or refuses it in one
line (LofaError), and through the `lofa` command: exit 2, one line on stderr, no traceback, nothing written.

Readers: LoRA files in each naming, base model files and folders, LoFA checkpoints, `lofa predict` conditions
(images, pose arrays, prompts) and YAML overrides. Under the default "ci" profile each test is bounded and
derandomized, so CI tries the same inputs every time; `--hypothesis-show-statistics` prints how many inputs each
reader was given, and `--hypothesis-profile explore` searches longer with fresh random inputs.
"""
import contextlib
import io
import json
import math
import struct
import sys

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from lofa.cli import main
from lofa.config import OVERRIDABLE, load_overrides
from lofa.errors import LofaError
from lofa.lora.formats import LoraFactor, load_base_weights, load_lora, save_lora

pytestmark = pytest.mark.usefixtures("one_thread")

# The profile (tests/conftest.py: "ci" by default, `--hypothesis-profile explore` for a long random search) sets
# how many inputs each reader gets; a test that runs a whole `lofa` command per input gets a third of them.
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ_CLI = settings(FUZZ, max_examples=max(1, settings.default.max_examples // 3))

# A few linear modules of a Wan DiT, in diffusers naming: every LoRA naming lofa writes can express them.
MODULES = {"blocks.0.attn1.to_q": (8, 8), "blocks.0.attn2.to_k": (8, 6), "blocks.1.ffn.net.0.proj": (16, 8)}
FORMATS = ("diffusers", "wan", "kohya")
DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8,
          torch.bool)


def one_line(err: BaseException | str) -> bool:
    text = str(err)
    return bool(text.strip()) and "\n" not in text.strip() and "Traceback" not in text


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`lofa ARGV` in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def assert_refused(code: int, err: str, command: str) -> None:
    assert code == 2, err
    assert err.startswith(f"lofa {command}: error: ") or err.startswith("lofa: error:"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


# --- byte-level damage -------------------------------------------------------------------------------------------
@st.composite
def damage(draw, data: bytes) -> bytes:
    """`data` unchanged, cut short, with bytes overwritten (mostly in the header) or replaced by noise."""
    kind = draw(st.sampled_from(["none", "truncate", "overwrite", "noise", "header length"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "overwrite":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, min(len(out), 160) - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "noise":
        return draw(st.binary(max_size=300))
    if kind == "header length":  # safetensors' first 8 bytes: the header's length
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    return data


# --- LoRA files ----------------------------------------------------------------------------------------------------
def lora_weights(seed: int, rank: int) -> dict[str, LoraFactor]:
    g = torch.Generator().manual_seed(seed)
    return {name: LoraFactor(A=torch.randn(rank, inp, generator=g), B=torch.randn(out, rank, generator=g),
                             alpha=float(rank) * 0.5) for name, (out, inp) in MODULES.items()}


@st.composite
def tensor_damage(draw, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """One change to a LoRA file's tensors or metadata -> (tensors, metadata)."""
    tensors, metadata = dict(tensors), dict(metadata)
    key = draw(st.sampled_from(sorted(tensors)))
    x = tensors[key]
    kind = draw(st.sampled_from(["none", "dtype", "non-finite", "rank 0", "rank mismatch", "drop", "dims",
                                 "alpha", "extra key", "metadata"]))
    if kind == "dtype":
        tensors[key] = x.to(draw(st.sampled_from(DTYPES)))
    elif kind == "non-finite":
        y = x.clone().float()
        y.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[key] = y
    elif kind in ("rank 0", "rank mismatch"):
        cut = 0 if kind == "rank 0" else 1
        if x.ndim == 2:
            tensors[key] = x[:cut] if x.shape[0] < x.shape[1] else x[:, :cut]
    elif kind == "drop":
        del tensors[key]
    elif kind == "dims":
        ndim = draw(st.sampled_from([0, 1, 3, 4]))
        tensors[key] = x.reshape(-1)[0] if ndim == 0 else x.reshape(-1) if ndim == 1 else x.reshape(
            *x.shape, *([1] * (ndim - x.ndim))) if x.ndim <= ndim else x
    elif kind == "alpha":
        alpha_keys = [k for k in tensors if k.endswith(".alpha")]
        value = draw(st.sampled_from([-2.0, 0.0, math.nan, 1e30, 2.0]))
        shape = draw(st.sampled_from([(), (1,), (2,), (0,)]))
        if alpha_keys:
            tensors[draw(st.sampled_from(alpha_keys))] = torch.full(shape, value)
        elif metadata:
            meta_key = draw(st.sampled_from(sorted(metadata)))
            config = json.loads(metadata[meta_key]) if metadata[meta_key].startswith("{") else {}
            config[draw(st.sampled_from(["lora_alpha", "r", "alpha_pattern", "use_rslora", "rank_pattern"]))] = \
                draw(st.sampled_from([value, "x", None, [1, 2], {"to_q": "y"}, {"blocks": -1.0}]))
            metadata[meta_key] = json.dumps(config)
    elif kind == "extra key":
        tensors[draw(st.sampled_from(["unknown.weight", "blocks.0.attn1.to_q.lora_C.weight", "x.diff",
                                      "blocks.0.attn1.to_q.dora_scale"]))] = torch.zeros(2, 2)
    elif kind == "metadata" and metadata:
        metadata[draw(st.sampled_from(sorted(metadata)))] = draw(st.text(max_size=20))
    return tensors, metadata


def check_lora(weights: dict[str, LoraFactor]) -> None:
    """What every LoRA load_lora returns satisfies: known modules, 2-D float factors of one positive rank, finite
    values and a finite positive scale."""
    for name, f in weights.items():
        assert name in MODULES
        assert f.A.ndim == 2 and f.B.ndim == 2 and f.A.is_floating_point() and f.B.is_floating_point()
        assert f.rank >= 1 and f.A.shape[0] == f.B.shape[1] and tuple(f.shape) == MODULES[name]
        assert math.isfinite(f.alpha) and f.alpha > 0
        assert torch.isfinite(f.delta_w).all()


@FUZZ
@given(fmt=st.sampled_from(FORMATS), rank=st.integers(1, 3), data=st.data())
def test_fuzzed_lora_files_are_read_or_refused_in_one_line(tmp_path_factory, fmt, rank, data):
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    original = lora_weights(rank, rank)
    save_lora(path, original, {"case_id": 1}, fmt=fmt)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    tensors, metadata = data.draw(tensor_damage(load_file(str(path)), metadata))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    path.write_bytes(data.draw(damage(path.read_bytes())))
    try:
        weights, _ = load_lora(path, module_names=list(MODULES))
    except LofaError as err:
        assert one_line(err), err
        return
    check_lora(weights)


@FUZZ_CLI
@given(fmt=st.sampled_from(FORMATS), data=st.data())
def test_fuzzed_lora_files_through_lofa_response_map(tmp_path_factory, fmt, data):
    """The same damage through `lofa response-map`: a JSON summary, or exit 2 in one line and no plot."""
    folder = tmp_path_factory.mktemp("map")
    save_file(base_state(), str(folder / "base.safetensors"))
    path = folder / "lora.safetensors"
    save_lora(path, lora_weights(1, 2), fmt=fmt)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    tensors, metadata = data.draw(tensor_damage(load_file(str(path)), metadata))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    path.write_bytes(data.draw(damage(path.read_bytes())))
    plot = folder / "map.png"
    code, printed, err = run_cli(["response-map", "--base", str(folder / "base.safetensors"), "--lora", str(path),
                                  "--json", "--plot", str(plot)])
    if code == 0:
        summary = json.loads(printed)
        assert summary and plot.exists() and "Traceback" not in err
    else:
        assert_refused(code, err, "response-map")
        assert not plot.exists()


def test_every_naming_reads_back_undamaged(tmp_path):
    """The fuzz's 'none' branch, asserted exactly: an undamaged file gives back its ΔW."""
    original = lora_weights(0, 2)
    for fmt in FORMATS:
        save_lora(tmp_path / f"{fmt}.safetensors", original, fmt=fmt)
        weights, _ = load_lora(tmp_path / f"{fmt}.safetensors", module_names=list(MODULES))
        assert set(weights) == set(MODULES)
        for name, f in weights.items():
            torch.testing.assert_close(f.delta_w, original[name].delta_w)


# --- base model files and folders --------------------------------------------------------------------------------
def base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.weight": torch.randn(shape, generator=g) for name, shape in MODULES.items()}


@FUZZ
@given(layout=st.sampled_from(["file", "folder", "sharded"]), data=st.data())
def test_fuzzed_base_models_are_read_or_refused_in_one_line(tmp_path_factory, layout, data):
    root = tmp_path_factory.mktemp("base")
    state = base_state()
    key = data.draw(st.sampled_from(sorted(state)))
    change = data.draw(st.sampled_from(["none", "dtype", "non-finite", "dims", "drop"]))
    if change == "dtype":
        state[key] = state[key].to(data.draw(st.sampled_from(DTYPES)))
    elif change == "non-finite":
        state[key] = state[key].clone()
        state[key][0, 0] = data.draw(st.sampled_from([math.nan, math.inf]))
    elif change == "dims":
        state[key] = state[key].reshape(-1)
    elif change == "drop":
        del state[key]
    if layout == "file":
        files = {root / "base.safetensors": state}
        path = root / "base.safetensors"
    else:
        path = root / "model"
        path.mkdir()
        (path / "config.json").write_text("{}")
        if layout == "folder":
            files = {path / "diffusion_pytorch_model.safetensors": state}
        else:
            names = sorted(state)
            shards = {path / f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": dict(
                (k, state[k]) for k in names[i::2]) for i in range(2)}
            files = {f: s for f, s in shards.items() if s}
            index = {"metadata": {}, "weight_map": {k: f.name for f, s in files.items() for k in s}}
            text = json.dumps(index)
            if data.draw(st.booleans()):
                text = data.draw(st.sampled_from(["", "{", "[]", '{"weight_map": 3}', '{"weight_map": {"a": 1}}',
                                                  '{"weight_map": {"x.weight": "missing.safetensors"}}']))
            (path / "diffusion_pytorch_model.safetensors.index.json").write_text(text)
    for file, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
    damaged = data.draw(st.sampled_from(sorted(files)))
    damaged.write_bytes(data.draw(damage(damaged.read_bytes())))
    try:
        weights = load_base_weights(path, list(MODULES))
    except LofaError as err:
        assert one_line(err), err
        return
    assert set(weights) == set(MODULES)
    for name, w in weights.items():
        assert w.is_floating_point() and tuple(w.shape) == MODULES[name] and torch.isfinite(w).all()


# --- LoFA checkpoints --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny image-conditioned LoFA checkpoint (both stages) over a UNet-like base saved beside it."""
    from test_hypernet import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "image", input_shape=(3, 16, 16), stage1=True)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) |
                           st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@st.composite
def checkpoint_damage(draw, folder):
    """One change to a checkpoint folder (a copy): its config.json, a weights file, or a file removed."""
    files = sorted(p.name for p in folder.iterdir())
    name = draw(st.sampled_from(files))
    path = folder / name
    kind = draw(st.sampled_from(["none", "bytes", "remove", "json value", "json key"]))
    if kind == "bytes":
        path.write_bytes(draw(damage(path.read_bytes())))
    elif kind == "remove":
        path.unlink()
    elif kind in ("json value", "json key"):
        config = json.loads((folder / "config.json").read_text())
        section = draw(st.sampled_from(sorted(config)))
        if kind == "json key" or not isinstance(config[section], dict) or not config[section]:
            config[section] = draw(JSON_VALUES)
        else:
            field = draw(st.sampled_from(sorted(config[section])))
            config[section][field] = draw(JSON_VALUES)
        (folder / "config.json").write_text(json.dumps(config))
    return kind


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoints_load_and_predict_or_are_refused_in_one_line(checkpoint, tmp_path_factory, data):
    import shutil

    from lofa.hypernet import LoFA

    folder = tmp_path_factory.mktemp("copy") / "lofa"
    shutil.copytree(checkpoint, folder)
    shutil.copy(checkpoint.parent / "base.safetensors", folder.parent / "base.safetensors")
    data.draw(checkpoint_damage(folder))
    try:
        model = LoFA.from_pretrained(folder)
        if model.base is None:
            return
        tokens, mask = model.encode_condition(image=Image.new("RGB", (20, 12), (200, 30, 90)))
        lora = model.predict(tokens, mask)
    except LofaError as err:
        assert one_line(err), err
        return
    for f in lora.values():
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()


# --- `lofa predict` conditions -----------------------------------------------------------------------------------
IMAGE_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV")
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif", "WEBP": ".webp"}


@st.composite
def image_files(draw, folder):
    """An image file of any mode, size and format, perhaps damaged -> (path, whether it was damaged)."""
    mode = draw(st.sampled_from(IMAGE_MODES))
    width, height = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if mode in ("I", "I;16"):
        pixels = rng.integers(0, 65536, (height, width)).astype(np.uint16 if mode == "I;16" else np.int32)
        image = Image.fromarray(pixels, mode=None)
    elif mode == "F":
        image = Image.fromarray(rng.random((height, width)).astype(np.float32))
    else:
        image = Image.new(mode, (width, height))
        noise = Image.frombytes("L", (width, height), rng.integers(0, 256, width * height, dtype=np.uint8).tobytes())
        image.paste(noise.convert(mode) if mode != "HSV" else noise.convert("RGB").convert("HSV"))
    fmt = draw(st.sampled_from(sorted(IMAGE_FORMATS)))
    path = folder / f"condition{IMAGE_FORMATS[fmt]}"
    try:
        image.save(path, format=fmt)
    except (OSError, ValueError, KeyError):
        assume(False)  # PIL cannot write this mode in this format: not an input a user could have
    data = path.read_bytes()
    damaged = draw(damage(data))
    path.write_bytes(damaged)
    return path, damaged != data


@FUZZ_CLI
@given(data=st.data())
def test_fuzzed_images_through_lofa_predict(checkpoint, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("image")
    path, damaged = data.draw(image_files(folder))
    out = folder / "out.safetensors"
    code, printed, err = run_cli(["predict", "--checkpoint", str(checkpoint), "--image", str(path),
                                  "--out", str(out), "--device", "cpu"])
    if code == 0:
        assert out.exists() and "Traceback" not in err
        check_lora_file(out)
    else:
        assert_refused(code, err, "predict")
        assert not out.exists() and not [p for p in folder.iterdir() if p.name.startswith(".")]
        assert damaged or "grey levels" in err, err  # an undamaged image is read, unless its values are impossible


def check_lora_file(path) -> None:
    weights, _ = load_lora(path)
    assert weights and all(torch.isfinite(f.delta_w).all() for f in weights.values())


@pytest.fixture(scope="module")
def pose_checkpoint(tmp_path_factory):
    from test_hypernet import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("pose"), "pose", input_shape=POSE_SHAPE)


POSE_SHAPE = (3, 4, 8, 8)
POSE_DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int64", "bool", "complex64")


@st.composite
def pose_files(draw, folder):
    """A pose array of any shape, dtype and range, saved as .npy / .pt / .safetensors -> (path, acceptable)."""
    good_shape = draw(st.booleans())
    if good_shape:
        shape = draw(st.sampled_from([POSE_SHAPE, (1, *POSE_SHAPE)]))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=6)))
    dtype = draw(st.sampled_from(POSE_DTYPES))
    low, high = sorted(draw(st.lists(st.floats(-300, 300), min_size=2, max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.uniform(low, high, size=shape)
    if draw(st.booleans()) and values.size:
        values.reshape(-1)[0] = draw(st.sampled_from([np.nan, np.inf]))
    with np.errstate(invalid="ignore"):  # NaN / inf cast to an integer dtype: whatever numpy makes of it
        array = values.astype(dtype)
    suffix = draw(st.sampled_from([".npy", ".pt", ".safetensors"]))
    path = folder / f"pose{suffix}"
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if dtype != "complex64" or suffix != ".safetensors" \
        else torch.zeros(1)
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".pt":
        torch.save(tensor, path)
    else:
        save_file({"pose": tensor.contiguous()}, str(path))
    data = path.read_bytes()
    damaged = draw(damage(data))
    path.write_bytes(damaged)
    floats = array.dtype.kind == "f"
    acceptable = (damaged == data and good_shape and floats and tensor.numel() > 1
                  and bool(np.isfinite(array).all()) and array.min() >= -1 and array.max() <= 1)
    return path, acceptable


@FUZZ_CLI
@given(data=st.data())
def test_fuzzed_pose_arrays_through_lofa_predict(pose_checkpoint, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("posefile")
    path, acceptable = data.draw(pose_files(folder))
    out = folder / "out.safetensors"
    code, printed, err = run_cli(["predict", "--checkpoint", str(pose_checkpoint), "--pose", str(path),
                                  "--out", str(out), "--device", "cpu"])
    if acceptable:
        assert code == 0 and out.exists(), err
        check_lora_file(out)
    else:
        assert_refused(code, err, "predict")
        assert not out.exists()


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    from test_hypernet import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("text"), "text")


PROMPTS = st.one_of(st.text(max_size=40), st.text(alphabet=" \t\n\r\u00a0\u3000", max_size=5),
                    st.text(min_size=300, max_size=3000),
                    st.sampled_from(["a person kicks", "人が左足で蹴る", "🙂" * 50, "\u200b", "x" * 20000]))


@FUZZ_CLI
@given(prompt=PROMPTS.filter(lambda p: "\x00" not in p))  # a command line cannot hold NUL
def test_fuzzed_prompts_through_lofa_predict(text_checkpoint, tmp_path_factory, prompt):
    import warnings

    folder = tmp_path_factory.mktemp("prompt")
    out = folder / "out.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # --prompt=TEXT: a prompt that starts with "-" is a value only in this form, as for every argparse option
        code, printed, err = run_cli(["predict", "--checkpoint", str(text_checkpoint), f"--prompt={prompt}",
                                      "--out", str(out), "--device", "cpu"])
    if prompt.strip():
        assert code == 0 and out.exists(), err
        assert all(line.startswith("lofa: warning: ") for line in err.splitlines()), err
    else:
        assert_refused(code, err, "predict")
        assert "the prompt is empty" in err and not out.exists()


# --- YAML overrides ----------------------------------------------------------------------------------------------
def config_fields() -> dict[str, list[str]]:
    import dataclasses
    import importlib

    return {name: [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))]
            for name, (module, cls) in OVERRIDABLE.items()}


FIELDS = config_fields()
SCALARS = st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=False, width=32) | \
    st.sampled_from(["1e-3", "cosine", "constant", "", "cuda"])
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.sampled_from(["actions", "styles", "x", "steps"]), inner, max_size=2),
                      max_leaves=5)


@st.composite
def overrides_documents(draw):
    """YAML text: a mapping of (mostly real) config names to (mostly real) fields and values of any type, or
    arbitrary text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=60))
    doc = {}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(FIELDS)) | st.text(max_size=8))
        fields = {}
        for _ in range(draw(st.integers(0, 3))):
            field = draw(st.sampled_from(FIELDS.get(name) or ["steps"]) | st.text(max_size=6))
            fields[field] = draw(VALUES)
        doc[name] = fields if draw(st.integers(0, 6)) else draw(VALUES)
    return yaml.safe_dump(doc)


@FUZZ
@given(text=overrides_documents())
def test_fuzzed_overrides_are_validated_or_refused_in_one_line(tmp_path_factory, text):
    """Accepted overrides build every config they name at every scale (they cannot fail later, minutes into a
    run); refused ones are refused in one line, before anything runs."""
    from lofa.config import preset

    path = tmp_path_factory.mktemp("yaml") / "overrides.yaml"
    path.write_text(text)
    try:
        overrides = load_overrides(path)
    except LofaError as err:
        assert one_line(err), err
        return
    import importlib

    for name, fields in overrides.items():
        module, cls = OVERRIDABLE[name]
        for scale in ("smoke", "mini"):
            try:
                preset(getattr(importlib.import_module(module), cls), scale, fields or {})
            except LofaError as err:
                assert one_line(err), err


def test_bad_overrides_stop_lofa_train_before_any_work(tmp_path):
    bad = {"NoSuchConfig: {steps: 3}": "unknown config 'NoSuchConfig'",
           "Stage2TrainConfig: {stepz: 3}": "has no field 'stepz'",
           "Stage2TrainConfig: {steps: many}": "is not of type int",
           "BaseTrainConfig: {model_overrides: {no_such_field: 3}}": "no_such_field",
           "[unclosed": "not valid YAML"}
    for text, message in bad.items():
        path = tmp_path / "o.yaml"
        path.write_text(text)
        code, _, err = run_cli(["train", "--setting", "identities", "--scale", "smoke", "--device", "cpu",
                                "--run-root", str(tmp_path / "runs"), "--overrides", str(path)])
        assert_refused(code, err, "train")
        assert message in err, err
        assert not (tmp_path / "runs").exists()  # refused before any folder was made


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--hypothesis-show-statistics"]))


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--task", "nosuch", "--scale", "smoke", "--device", "cpu"], "unknown task 'nosuch'"),
    (["reproduce", "--scale", "smoke", "--only", "99", "--device", "cpu"], "--only '99' matches no notebook"),
    (["reproduce", "--scale", "smoke", "--tasks", "faces", "--device", "cpu"], "unknown task selection 'faces'"),
    (["pretrain", "--task", "all", "--scale", "smoke", "--device", "cpu", "--workers", "0"], "--workers 0"),
    (["train", "--setting", "nosuch", "--scale", "smoke", "--device", "cpu"], "unknown setting 'nosuch'"),
    (["pretrain", "--task", "identities", "--scale", "smoke", "--device", "cpu", "--overrides", "/nonexistent.yaml"],
     "overrides file /nonexistent.yaml not found"),
    (["bench", "latency", "--preset", "smoke", "--device", "cpu", "--runs", "0"], "at least 20 runs"),
    (["response-map", "--base", "/nonexistent", "--lora", "/nonexistent"], "/nonexistent: no such file or folder"),
])
def test_every_command_refuses_bad_input_through_lofa_in_one_line_and_makes_nothing(tmp_path, argv, message):
    if argv[0] in ("pretrain", "reproduce", "train"):
        argv = [*argv, "--run-root", str(tmp_path / "runs")]
    code, _, err = run_cli(argv)
    assert_refused(code, err, "bench latency" if argv[0] == "bench" else argv[0])
    assert message in err and not (tmp_path / "runs").exists(), err
