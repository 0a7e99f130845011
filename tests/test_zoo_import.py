"""`lofa zoo import`: LoRA files in three namings + a JSONL of conditions -> a zoo that `Zoo` reads back with the
source files' ΔW; every rule's refusal through `lofa` (exit 2, one line, nothing written); the rank rules; a fuzzed
JSONL reader."""
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from lofa.analysis import analyze_lora
from lofa.errors import LofaError
from lofa.lora import zoo_import
from lofa.lora.formats import BaseWeightsFile, LoraFactor, detect_format, load_base_weights, load_lora, save_lora
from lofa.lora.zoo import Zoo, base_fingerprint, weights_fingerprint
from lofa.lora.zoo_import import import_zoo, pad_rank, truncate_rank
from test_fuzz import FUZZ_CLI, assert_refused, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# A few linear modules of a Wan DiT in diffusers naming: each of the three namings can express them.
MODULES = {"blocks.0.attn1.to_q": (8, 8), "blocks.0.attn2.to_k": (8, 6), "blocks.1.ffn.net.0.proj": (16, 8)}
NAMES = list(MODULES)


def lora(seed: int, rank: int = 4, alpha: float | None = None, dtype=torch.float32, modules=MODULES):
    """{module: LoraFactor(A [rank, in], B [out, rank], alpha)}, alpha default rank / 2 (a power-of-two scale, so
    every naming stores bitwise the same ΔW)."""
    g = torch.Generator().manual_seed(seed)
    alpha = rank / 2 if alpha is None else alpha
    return {name: LoraFactor(A=(torch.randn(rank, inp, generator=g) * 0.3).to(dtype),
                             B=(torch.randn(out, rank, generator=g) * 0.3).to(dtype), alpha=alpha)
            for name, (out, inp) in modules.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """base.safetensors: {module.weight: W [out, in]} for MODULES (a tenth of the entries exactly zero)."""
    root = tmp_path_factory.mktemp("base")
    g = torch.Generator().manual_seed(100)
    weights = {}
    for name, (out, inp) in MODULES.items():
        w = torch.randn(out, inp, generator=g)
        w[torch.rand(out, inp, generator=g) < 0.1] = 0.0
        weights[f"{name}.weight"] = w
    save_file(weights, root / "base.safetensors")
    return root / "base.safetensors"


def make_folder(root, loras: dict, lines=None, text: str | None = None):
    """LoRA folder root/loras with `loras` ({file name: (weights, naming)}) and its conditions.jsonl (`lines`, one
    JSON object each, or raw `text`) -> (folder, jsonl)."""
    folder = root / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (weights, fmt) in loras.items():
        save_lora(folder / name, weights, fmt=fmt)
    jsonl = folder / "conditions.jsonl"
    jsonl.write_text(text if text is not None else "".join(json.dumps(line) + "\n" for line in lines))
    return folder, jsonl


def import_argv(folder, jsonl, base, out, *extra):
    return ["zoo", "import", str(folder), "--conditions", str(jsonl), "--base", str(base), "--out", str(out),
            *map(str, extra)]


def leftovers(out):
    """Temporary folders of an atomic write beside `out` (none may stay behind)."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def write_png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# --- the round trip ------------------------------------------------------------------------------------------------
def test_three_namings_import_as_one_zoo_with_the_same_delta_w(base, tmp_path):
    sources = {"a.safetensors": (lora(1), "diffusers"),
               "b.safetensors": (lora(2, alpha=8.0, dtype=torch.float16), "wan"),
               "c.safetensors": (lora(3, alpha=3.0), "kohya")}  # scale 3/4: not a power of two
    prompts = ["a person kicks", "人が左足で蹴る", "a person waves"]
    folder, jsonl = make_folder(tmp_path, sources, [{"file": name, "prompt": prompt}
                                                     for name, prompt in zip(sources, prompts)])
    out = tmp_path / "zoo"
    code, printed, err = run_cli(import_argv(folder, jsonl, base, out))
    assert code == 0, err
    assert "imported 3 LoRAs (prompt conditions, 3 modules, rank 4" in printed

    zoo = Zoo(out)
    index = json.loads((out / "index.json").read_text())
    assert len(zoo) == 3 and zoo.case_ids() == [0, 1, 2] and zoo.case_ids("train") == [0, 1, 2]
    assert zoo.task == "imported" and zoo.config is None
    assert index["condition_kind"] == "prompt" and index["rank"] == 4 and index["modules"] == NAMES
    assert index["base"] == weights_fingerprint(load_base_weights(base), NAMES)
    base_weights = BaseWeightsFile(base)
    for case_id, (name, prompt) in enumerate(zip(sources, prompts)):
        entry = zoo[case_id]
        source_weights, _ = load_lora(folder / name, module_names=NAMES)
        weights, meta = zoo.load(case_id)
        assert detect_format(zoo.path(case_id)) == "diffusers" and meta["case_id"] == case_id
        assert list(weights) == NAMES
        for module in NAMES:
            if name == "c.safetensors":  # alpha / r folded into B: float32 rounding
                torch.testing.assert_close(weights[module].delta_w, source_weights[module].delta_w)
            else:
                assert torch.equal(weights[module].delta_w, source_weights[module].delta_w), (name, module)
        assert entry["source"] == name and entry["line"] == case_id + 1
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert entry["condition"] == {"prompt": prompt} and entry["condition_source"] is None
        assert entry["naming"] == sources[name][1] and entry["modules"] == 3
        assert entry["rank"] == entry["source_rank"] == 4
        # diffusers naming stores alpha / r folded into B (alpha = r); Wan and kohya store alpha itself
        assert entry["alpha"] == {"a.safetensors": 4.0, "b.safetensors": 8.0, "c.safetensors": 3.0}[name]
        expected = analyze_lora(base_weights, source_weights, 0.02)["active_fraction"]
        # c's ΔW differs from its source's in float32 rounding: an entry at τ may flip (1 of 256)
        assert entry["density"] == pytest.approx(expected, abs=0.01) and 0 < entry["density"] < 1
        assert "truncation_error" not in entry
    assert leftovers(out) == []


def test_weights_fingerprint_is_base_fingerprint_of_the_same_tensors(base):
    """An imported zoo's base fingerprint is the one build_zoo writes for a generator holding the same weights."""
    weights = load_base_weights(base)
    net = torch.nn.Module()
    for name, w in weights.items():
        parent = net
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data = w.clone()
        parent.add_module(name.split(".")[-1], layer)
    gen = SimpleNamespace(net=net)
    assert base_fingerprint(gen, NAMES) == weights_fingerprint(weights, NAMES) == \
        weights_fingerprint(BaseWeightsFile(base), NAMES)


def test_image_and_pose_conditions_are_copied_into_the_zoo(base, tmp_path):
    folder, jsonl = make_folder(tmp_path / "img", {"a.safetensors": (lora(1), "diffusers"),
                                                   "b.safetensors": (lora(2), "kohya")},
                                [{"file": "a.safetensors", "image": "refs/a.png"},
                                 {"file": "b.safetensors", "image": "refs/b.JPG"}])
    jsonl.write_text("\ufeff" + jsonl.read_text() + "\n\n")  # a byte-order mark and blank lines are no lines
    write_png(folder / "refs" / "a.png", 0)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(folder / "refs" / "b.JPG", format="JPEG")
    out = tmp_path / "image_zoo"
    import_zoo(folder, jsonl, base, out)
    zoo = Zoo(out)
    assert zoo[0]["condition"] == {"image": "conditions/case_00000.png"}
    assert zoo[1]["condition"] == {"image": "conditions/case_00001.jpg"}
    assert zoo[0]["condition_source"] == "refs/a.png"
    assert (out / "conditions/case_00000.png").read_bytes() == (folder / "refs/a.png").read_bytes()

    # a pose kept beside the LoRAs as .safetensors is a condition, not a LoRA file without a line
    folder, jsonl = make_folder(tmp_path / "pose", {"a.safetensors": (lora(1), "wan")},
                                [{"file": "a.safetensors", "pose": "walk.safetensors"}])
    save_file({"pose": torch.rand(3, 4, 8, 8) * 2 - 1}, folder / "walk.safetensors")
    out = tmp_path / "pose_zoo"
    import_zoo(folder, jsonl, base, out)
    assert Zoo(out)[0]["condition"] == {"pose": "conditions/case_00000.safetensors"}
    assert json.loads((out / "index.json").read_text())["condition_kind"] == "pose"


# --- refusals ------------------------------------------------------------------------------------------------------
PROMPTS_AB = [{"file": "a.safetensors", "prompt": "x"}, {"file": "b.safetensors", "prompt": "y"}]
IMAGES_AB = [{"file": "a.safetensors", "image": "a.png"}, {"file": "b.safetensors", "image": "b.png"}]
WIDE = dict(MODULES, **{"blocks.0.attn1.to_q": (16, 8)})         # another base's shape
DEEPER = dict(MODULES, **{"blocks.2.attn1.to_q": (8, 8)})        # a module the base lacks
FEWER = dict(list(MODULES.items())[:2])
# case: (spec, the words the refusal must say); spec: weights of a.safetensors (diffusers naming) and b.safetensors
# ("b naming", default kohya) when not the defaults (None: no such file), conditions "lines" or raw "text", whether
# b is "damaged", "extra" options
CASES = {
    "other base (shape)": ({"b": lora(2, modules=WIDE)}, "'blocks.0.attn1.to_q' changes a [16, 8] weight but the "
                                                         "base model's is [8, 8]"),
    "other base (module)": ({"a": lora(1, modules=DEEPER)}, "a.safetensors: LoRA module 'blocks.2.attn1.to_q' is "
                                                           "not in the base model"),
    "other base (kohya)": ({"b": lora(2, modules=DEEPER)}, "b.safetensors: kohya key "
                                                          "'lora_unet_blocks_2_self_attn_q.alpha' matches no module"),
    "file without line": ({"lines": PROMPTS_AB[:1]}, "b.safetensors has no line in"),
    "line without file": ({"lines": PROMPTS_AB + [{"file": "c.safetensors", "prompt": "z"}]},
                          "line 3 names c.safetensors, which is not in"),
    "same file twice": ({"lines": PROMPTS_AB + [{"file": "a.safetensors", "prompt": "z"}]},
                        "lines 1 and 3 both name a.safetensors"),
    "identical content": ({"b": lora(1), "b naming": "diffusers"},
                          "(line 2) has the same content as a.safetensors (line 1)"),
    "identical content, other naming": ({"b": lora(1)}, "(line 2) has the same content as a.safetensors (line 1)"),
    "condition missing": ({"lines": IMAGES_AB}, "line 1: image"),
    "not JSON": ({"text": '{"file": "a.safetensors", "prompt": "x"}\n{"file": b}\n'}, "line 2: not JSON"),
    "not an object": ({"text": '["a.safetensors", "x"]\n'}, "line 1: a list, not a JSON object"),
    "not UTF-8": ({"text": b'{"file": "a.safetensors", "prompt": "\xff"}\n'}, "not UTF-8 text"),
    "no file": ({"lines": [{"prompt": "x"}]}, 'line 1: no "file"'),
    "file not a name": ({"lines": [{"file": "../a.safetensors", "prompt": "x"}]}, "is not a .safetensors file name"),
    "unknown key": ({"lines": [{"file": "a.safetensors", "promt": "x"}]}, "unknown key 'promt'"),
    "no condition": ({"lines": [{"file": "a.safetensors"}]}, "line 1: no condition"),
    "kinds in a line": ({"lines": [{"file": "a.safetensors", "prompt": "x", "image": "a.png"}]},
                        "mixes condition kinds prompt and image"),
    "kinds across lines": ({"lines": [PROMPTS_AB[0], {"file": "b.safetensors", "pose": "b.npy"}]},
                           "line 2 has a pose condition but line 1 a prompt"),
    "empty prompt": ({"lines": [PROMPTS_AB[0], {"file": "b.safetensors", "prompt": " \t"}]},
                     "line 2: the prompt is empty"),
    "prompt not text": ({"lines": [{"file": "a.safetensors", "prompt": 3}]}, '"prompt" is a int'),
    "ranks differ": ({"b": lora(2, rank=2)}, "has rank 2 at 'blocks.0.attn1.to_q' but a.safetensors rank 4; a zoo "
                                            "has one rank: pass --ranks pad"),
    "modules differ": ({"b": lora(2, modules=FEWER)},
                       "adapts 2 modules and a.safetensors (line 1) 3: it lacks module 'blocks.1.ffn.net.0.proj'"),
    "empty folder": ({"a": None, "b": None}, "holds no .safetensors LoRA files"),
    "no lines": ({"text": "\n \n"}, "holds no condition lines"),
    "damaged LoRA": ({"damaged": True}, "b.safetensors: not a readable safetensors file"),
    "truncate without rank": ({"extra": ("--ranks", "truncate")}, "needs --rank R"),
    "rank without truncate": ({"extra": ("--rank", 2)}, "is for --ranks truncate"),
    "bad tau": ({"extra": ("--tau", "nan")}, "--tau nan"),
}


def build_case(root, spec: dict):
    """The LoRA folder and JSONL of a refusal case (CASES) -> (folder, jsonl, extra options)."""
    loras = {}
    for name, weights in (("a.safetensors", spec.get("a", lora(1))), ("b.safetensors", spec.get("b", lora(2)))):
        if weights is not None:
            loras[name] = (weights, "diffusers" if name == "a.safetensors" else spec.get("b naming", "kohya"))
    text = spec.get("text")
    folder, jsonl = make_folder(root, loras, spec.get("lines", PROMPTS_AB), text if isinstance(text, str) else None)
    if isinstance(text, bytes):
        jsonl.write_bytes(text)
    if spec.get("damaged"):
        (folder / "b.safetensors").write_bytes((folder / "a.safetensors").read_bytes()[:100])
    return folder, jsonl, spec.get("extra", ())


def _two(root, lines, second=None):
    """Folder with a.safetensors and b.safetensors (b: `second`, default another LoRA) and `lines`."""
    folder, jsonl, _ = build_case(root, {"lines": lines, "b": lora(2) if second is None else second})
    return folder, jsonl


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_refuses_in_one_line_and_writes_nothing(base, tmp_path, case):
    spec, message = CASES[case]
    folder, jsonl, extra = build_case(tmp_path, spec)
    out = tmp_path / "zoo"
    code, printed, err = run_cli(import_argv(folder, jsonl, base, out, *extra))
    assert_refused(code, err, "zoo import")
    assert message in err, err
    assert not out.exists() and leftovers(out) == []


def test_unreadable_conditions_are_refused(base, tmp_path):
    folder, jsonl = _two(tmp_path, [{"file": "a.safetensors", "image": "a.png"},
                                    {"file": "b.safetensors", "image": "b.png"}])
    write_png(folder / "a.png", 0)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "zoo"
    code, _, err = run_cli(import_argv(folder, jsonl, base, out))
    assert_refused(code, err, "zoo import")
    assert "line 2: image" in err and "not a readable image" in err and not out.exists()

    lines = [{"file": "a.safetensors", "pose": "a.npy"}, {"file": "b.safetensors", "pose": "b.npy"}]
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    np.save(folder / "a.npy", np.zeros((3, 4, 8, 8), dtype=np.float32))
    np.save(folder / "b.npy", np.full((3, 4, 8, 8), 255, dtype=np.float32))  # 0-255 frames
    code, _, err = run_cli(import_argv(folder, jsonl, base, out))
    assert_refused(code, err, "zoo import")
    assert "line 2: pose" in err and "pose values lie in [255, 255]" in err and not out.exists()


def test_existing_output_is_refused_unless_force(base, tmp_path):
    folder, jsonl = _two(tmp_path, PROMPTS_AB)
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run_cli(import_argv(folder, jsonl, base, out))
    assert_refused(code, err, "zoo import")
    assert "exists; pass --force" in err and (out / "mine.txt").read_text() == "keep me"

    code, _, err = run_cli(import_argv(folder, jsonl, base, out, "--force"))
    assert code == 0, err
    assert not (out / "mine.txt").exists() and len(Zoo(out)) == 2 and leftovers(out) == []

    # --force never replaces a folder holding the import's own inputs
    code, _, err = run_cli(import_argv(folder, jsonl, base, folder, "--force"))
    assert_refused(code, err, "zoo import")
    assert "holds the import's input" in err and (folder / "a.safetensors").exists()


def test_an_interrupted_import_leaves_nothing_and_the_old_zoo_whole(base, tmp_path, monkeypatch):
    folder, jsonl = _two(tmp_path, PROMPTS_AB)
    out = tmp_path / "zoo"
    calls = []

    def save_then_stop(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second LoRA is written
        return save_lora(*args, **kwargs)

    monkeypatch.setattr(zoo_import, "save_lora", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        import_zoo(folder, jsonl, base, out)
    assert not out.exists() and leftovers(out) == []

    monkeypatch.setattr(zoo_import, "save_lora", save_lora)
    import_zoo(folder, jsonl, base, out)
    before = {p.name: p.read_bytes() for p in (out / "loras").iterdir()}
    calls.clear()
    monkeypatch.setattr(zoo_import, "save_lora", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        import_zoo(folder, jsonl, base, out, force=True)
    assert {p.name: p.read_bytes() for p in (out / "loras").iterdir()} == before and leftovers(out) == []


# --- rank rules ----------------------------------------------------------------------------------------------------
def test_pad_keeps_delta_w_and_gives_every_lora_the_largest_rank(base, tmp_path):
    folder, jsonl = _two(tmp_path, PROMPTS_AB, second=lora(2, rank=2, alpha=3.0))
    out = tmp_path / "zoo"
    code, printed, err = run_cli(import_argv(folder, jsonl, base, out, "--ranks", "pad"))
    assert code == 0, err
    zoo = Zoo(out)
    assert [zoo[c]["rank"] for c in (0, 1)] == [4, 4] and [zoo[c]["source_rank"] for c in (0, 1)] == [4, 2]
    for case_id, name in enumerate(("a.safetensors", "b.safetensors")):
        source, _ = load_lora(folder / name, module_names=NAMES)
        weights, _ = zoo.load(case_id)
        for module in NAMES:
            assert weights[module].rank == 4
            torch.testing.assert_close(weights[module].delta_w, source[module].delta_w)

    factor = lora(5, rank=2, alpha=0.7)["blocks.0.attn2.to_k"]
    padded = pad_rank(factor, 6)
    assert padded.rank == 6 and padded.A[2:].abs().sum() == 0 and padded.B[:, 2:].abs().sum() == 0
    torch.testing.assert_close(padded.delta_w, factor.delta_w)


def best_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def test_truncate_keeps_the_top_singular_directions_and_reports_the_error(base, tmp_path):
    loras = {"a.safetensors": (lora(1, rank=4, alpha=3.0), "diffusers"), "b.safetensors": (lora(2, rank=2), "wan"),
             "c.safetensors": (lora(3, rank=1), "kohya")}
    lines = [{"file": name, "prompt": name} for name in loras]
    folder, jsonl = make_folder(tmp_path, loras, lines)
    out = tmp_path / "zoo"
    code, printed, err = run_cli(import_argv(folder, jsonl, base, out, "--ranks", "truncate", "--rank", 2))
    assert code == 0, err
    assert "truncation error up to" in printed
    zoo = Zoo(out)
    for case_id, name in enumerate(loras):
        source, _ = load_lora(folder / name, module_names=NAMES)
        weights, _ = zoo.load(case_id)
        squared_error = squared_norm = 0.0
        for module in NAMES:
            assert weights[module].rank == 2
            delta = source[module].delta_w.double()
            expected = best_rank(delta, 2)
            torch.testing.assert_close(weights[module].delta_w.double(), expected, rtol=1e-5, atol=1e-6)
            squared_error += float((weights[module].delta_w.double() - delta).square().sum())
            squared_norm += float(delta.square().sum())
        entry = zoo[case_id]
        assert entry["rank"] == 2
        assert entry["truncation_error"] == pytest.approx(np.sqrt(squared_error / squared_norm), rel=1e-4, abs=1e-7)
        assert (entry["truncation_error"] > 0.1) == (name == "a.safetensors")  # rank 2 and 1: ΔW kept (1 padded)

    # a module with fewer outputs than its rank: ΔW has min(out, in) directions at most
    factor = LoraFactor(A=torch.randn(4, 6), B=torch.randn(3, 4), alpha=4.0)
    cut, dropped, total = truncate_rank(factor, 2)
    assert cut.rank == 2 and cut.shape == (3, 6)
    torch.testing.assert_close(cut.delta_w.double(), best_rank(factor.delta_w, 2), rtol=1e-5, atol=1e-5)
    assert dropped / total == pytest.approx(float((cut.delta_w - factor.delta_w).square().sum()) / total, rel=1e-4)


def test_rank_options_are_checked(base, tmp_path):
    folder, jsonl = _two(tmp_path, PROMPTS_AB)
    with pytest.raises(LofaError, match="--rank 0: give a rank of at least 1"):
        import_zoo(folder, jsonl, base, tmp_path / "zoo", ranks="truncate", rank=0)
    with pytest.raises(LofaError, match="--ranks 'cut'"):
        import_zoo(folder, jsonl, base, tmp_path / "zoo", ranks="cut")


# --- fuzzed JSONL --------------------------------------------------------------------------------------------------
FUZZ_FILES = ("a.safetensors", "b.safetensors")


def json_containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


def not_text(value) -> bool:
    return not isinstance(value, str)


def one_line_of_text(text: str) -> bool:
    return "\n" not in text


def not_a_line_key(key: str) -> bool:
    return key not in ("file", "prompt")


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=8),
                           json_containers, max_leaves=6)
LINE_KINDS = ("good", "empty prompt", "prompt not text", "no file", "unknown file", "extra kind", "extra key",
              "missing image")


@st.composite
def jsonl_documents(draw):
    """(JSONL text, whether an import must succeed): lines for the two LoRA files, each good or broken in one way,
    perhaps a file left out, perhaps junk lines (text or any JSON value) in between, in any order."""
    lines, ok = [], True
    for name in FUZZ_FILES:
        if draw(st.integers(0, 9)) == 0:
            ok = False  # a LoRA file without a line
            continue
        kind = draw(st.sampled_from(LINE_KINDS)) if draw(st.integers(0, 3)) == 0 else "good"
        prompt = draw(st.text(min_size=1, max_size=20))
        entry = {"file": name, "prompt": prompt}
        if kind == "empty prompt":
            entry["prompt"] = draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))
        elif kind == "prompt not text":
            entry["prompt"] = draw(JSON_VALUES.filter(not_text))
        elif kind == "no file":
            del entry["file"]
        elif kind == "unknown file":
            entry["file"] = draw(st.sampled_from(["c.safetensors", "", "a", "sub/a.safetensors", 3]))
        elif kind == "extra kind":
            entry["image"] = "ref.png"
        elif kind == "extra key":
            entry[draw(st.text(min_size=1, max_size=6).filter(not_a_line_key))] = 1
        elif kind == "missing image":
            entry = {"file": name, "image": "nowhere.png"}
        ok = ok and kind == "good" and bool(prompt.strip())
        lines.append(json.dumps(entry, ensure_ascii=draw(st.booleans())))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        junk = draw(st.one_of(st.text(max_size=30), JSON_VALUES.map(json.dumps)).filter(one_line_of_text))
        ok = ok and not junk.strip()  # blank lines are skipped; anything else is not a condition line
        lines.insert(draw(st.integers(0, len(lines))), junk)
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"])), ok


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_loras")
    save_lora(folder / "a.safetensors", lora(1), fmt="diffusers")
    save_lora(folder / "b.safetensors", lora(2), fmt="kohya")
    return folder


@FUZZ_CLI
@given(document=jsonl_documents())
def test_fuzzed_jsonl_is_imported_or_refused_in_one_line(base, fuzz_folder, tmp_path_factory, document):
    text, ok = document
    root = tmp_path_factory.mktemp("fuzz")
    jsonl = root / "conditions.jsonl"
    jsonl.write_text(text, encoding="utf-8")
    out = root / "zoo"
    code, printed, err = run_cli(import_argv(fuzz_folder, jsonl, base, out))
    event("imported" if ok else "refused")  # --hypothesis-show-statistics: how often each outcome was tried
    if ok:
        assert code == 0, err
        assert len(Zoo(out)) == 2
    else:
        assert_refused(code, err, "zoo import")
        assert not out.exists() and leftovers(out) == []
