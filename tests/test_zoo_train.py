"""`lofa zoo train`: LoFA trained on an imported zoo of a (tiny, random) Wan2.1 in the original layout, prompts read
by a local umT5 encoder; the predicted LoRA follows the prompt and loads into the diffusers Wan transformer."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lofa.lora.formats import LoraFactor, load_lora, save_lora
from test_fuzz import assert_refused, run_cli
from test_wan_local import _save_original, _tiny_wan, umt5_folder  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIONS = {"kick": ["a person kicks with the left leg", "someone kicks high", "a man kicks a ball", "a kick"],
           "wave": ["a person waves the right arm", "someone waves hello", "a woman waves", "a wave"]}
OVERRIDES = "TrainConfig: {steps: 30, batch_size: 4}\nStage2TrainConfig: {steps: 200, batch_size: 6, lr: 3.0e-3}\n"


def _zoo_loras(net, rank: int = 4):
    """{file: (LoRA, prompt)}: each action's LoRAs share one ΔW direction per module, plus a little noise."""
    g = torch.Generator().manual_seed(5)
    names = [n for n, m in net.named_modules() if n.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0"))]
    direction = {a: {n: (torch.randn(16, rank, generator=g), torch.randn(rank, 16, generator=g)) for n in names}
                 for a in ACTIONS}
    out = {}
    for action, prompts in ACTIONS.items():
        for i, prompt in enumerate(prompts):
            lora = {n: LoraFactor(A=a + 0.1 * torch.randn(a.shape, generator=g),
                                  B=0.05 * (b + 0.1 * torch.randn(b.shape, generator=g)), alpha=float(rank))
                    for n, (b, a) in direction[action].items()}
            out[f"{action}_{i}.safetensors"] = (lora, prompt)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory, umt5_folder):  # noqa: F811
    root = tmp_path_factory.mktemp("zoo_train")
    net = _tiny_wan()
    _save_original(net, root / "wan")
    (root / "loras").mkdir()
    lines = []
    for file, (lora, prompt) in _zoo_loras(net).items():
        save_lora(root / "loras" / file, lora, fmt="wan")
        lines.append(json.dumps({"file": file, "prompt": prompt}))
    (root / "loras" / "conditions.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(["zoo", "import", str(root / "loras"), "--conditions",
                              str(root / "loras" / "conditions.jsonl"), "--base", str(root / "wan"),
                              "--out", str(root / "zoo")])
    assert code == 0, err
    (root / "overrides.yaml").write_text(OVERRIDES)
    return root, net


def test_train_then_predict_follows_the_prompt(imported, umt5_folder, tmp_path):  # noqa: F811
    root, net = imported
    ckpt = root / "lofa"
    args = ["zoo", "train", str(root / "zoo"), "--out", str(ckpt), "--text-encoder", str(umt5_folder), "--scale",
            "smoke", "--device", "cpu", "--overrides", str(root / "overrides.yaml"), "--heldout", "2"]
    code, out, err = run_cli(args)
    assert code == 0, err
    config = json.loads((ckpt / "config.json").read_text())
    assert config["condition_encoder"]["encoder"] == "umt5"
    history = json.loads((ckpt / "stage2" / "history.json").read_text())
    assert len(history) == 200 and {"heldout_cosine", "train_cosine"} <= set(history[-1])
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-5:]) / 5
    assert last < first  # Stage II learns on the zoo
    assert run_cli(args)[0] == 0  # a complete checkpoint is only loaded

    means = {}
    for action in ACTIONS:
        loras = [load_lora(root / "zoo" / "loras" / f"case_{i:05d}.safetensors")[0]
                 for i, f in enumerate(sorted(_zoo_loras(net))) if f.startswith(action)]
        means[action] = {n: torch.stack([w[n].delta_w for w in loras]).mean(0) for n in loras[0]}
    for action, prompt in (("kick", "someone kicks high"), ("wave", "someone waves hello")):
        path = tmp_path / f"{action}.safetensors"
        code, out, err = run_cli(["predict", "--checkpoint", str(ckpt), "--prompt", prompt, "--out", str(path),
                                  "--device", "cpu"])
        assert code == 0, err
        pred, _ = load_lora(path)
        assert set(pred) == set(means[action])

        def cosine(a, b):
            x = torch.cat([a[n].flatten() for n in sorted(a)])
            y = torch.cat([b[n].flatten() for n in sorted(a)])
            return float(x @ y / (x.norm() * y.norm()))

        dw = {n: f.delta_w for n, f in pred.items()}
        other = "wave" if action == "kick" else "kick"
        # a training prompt's LoRA lands on its action's LoRAs (cosine 0.99 when written), not on the other's (0.0)
        assert cosine(dw, means[action]) > 0.9 and cosine(dw, means[other]) < 0.5
        target = _tiny_wan()
        target.load_lora_adapter(load_file(path), prefix="transformer", adapter_name="lofa")
        assert "lofa" in target.peft_config  # every key found a module of the diffusers Wan transformer


def _refused(argv, match: str) -> None:
    code, out, err = run_cli(argv)
    assert_refused(code, err, "zoo train")
    assert match in err, err


def test_zoo_train_refusals(imported, tmp_path):
    root, net = imported
    args = ["zoo", "train", str(root / "zoo"), "--scale", "smoke", "--device", "cpu"]
    _refused(args + ["--out", str(tmp_path / "a"), "--heldout", "8"], "--heldout 8")
    other = _tiny_wan()
    with torch.no_grad():
        other.blocks[0].attn1.to_q.weight.add_(1.0)
    _save_original(other, tmp_path / "other_wan")
    _refused(args + ["--out", str(tmp_path / "b"), "--base", str(tmp_path / "other_wan")], "not the model")
    _refused(args + ["--out", str(tmp_path / "c"), "--text-encoder", str(tmp_path / "nowhere")], "no such folder")
    _refused(["zoo", "train", str(tmp_path / "nozoo"), "--out", str(tmp_path / "d")], "index.json")
    assert not any((tmp_path / d).exists() for d in "abcd")
