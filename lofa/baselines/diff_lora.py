"""DiffLoRA-style baseline (Wu et al., 2024): a LoRA autoencoder and a conditional latent diffusion model over its
latents; a LoRA is sampled for a condition, with no test-time optimisation.

The autoencoder is linear. A LoRA is the vector of its factors (A and B of every target, in the target order of
the zoo), minus the training LoRAs' mean, each target's block divided by its RMS over the training zoo; the encoder
projects it on the top `latent_dim` principal directions of the training LoRAs (PCA: the optimum of a linear
autoencoder under squared error) and the decoder maps back. The diffusion model is a flow-matching MLP over the
standardised latents, conditioned on the pooled condition (`pool_condition`) and t, trained on every training case
with its train-split condition views. Sampling integrates it with `sample_steps` Euler steps from noise drawn with
a fixed seed, so one condition always gives one LoRA.

    model, losses = train_diff_lora(data, preset(DiffLoraConfig, "mini"), seed=0)   # data: a Triplets
    loras = predict_cases(model, data.conditions("eval"), data.heldout_ids)  # {case_id: LoraWeights}
    model.save_pretrained(out_dir); DiffLora.from_pretrained(out_dir)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lofa.baselines.reference import pool_condition
from lofa.errors import LofaError
from lofa.io import read_json, save_safetensors, write_json
from lofa.lora.formats import LoraFactor, LoraWeights
from lofa.optimise import one_cycle

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diff_lora.safetensors"
METHOD = "DiffLoRA-style"
# The settings the paper compares DiffLoRA on (Table 3, identity images).
PAPER_SETTINGS = ("identities",)


@dataclass
class DiffLoraConfig:
    """The LoRA autoencoder's width and the latent diffusion model's network, training and sampling."""

    latent_dim: int = field(default=64, metadata={
        "help": "Principal directions the autoencoder keeps (at most the number of training LoRAs minus one)."})
    hidden: int = field(default=256, metadata={"help": "Width of the denoising MLP."})
    depth: int = field(default=3, metadata={"help": "Residual blocks of the denoising MLP."})
    steps: int = field(default=3000, metadata={"help": "Training steps of the diffusion model."})
    batch_size: int = field(default=64, metadata={"help": "Training LoRAs (with a random condition view) a step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of AdamW's one-cycle schedule."})
    sample_steps: int = field(default=20, metadata={"help": "Euler steps of the sampler, from t = 1 (noise) to 0."})
    sample_seed: int = field(default=0, metadata={
        "help": "Seed of the sampler's starting noise, the same for every condition."})

    PRESETS = {"smoke": {"latent_dim": 8, "hidden": 32, "depth": 1, "steps": 60, "batch_size": 16, "sample_steps": 4},
               "mini": {}, "full": {}, "wan": {}, "paper": {}}

    def __post_init__(self):
        for name in ("latent_dim", "hidden", "steps", "batch_size", "sample_steps"):
            if getattr(self, name) < 1:
                raise LofaError(f"DiffLoraConfig.{name} must be a positive integer, not {getattr(self, name)}")


class Block(nn.Module):
    """x + MLP(LayerNorm(x) + h): [N, hidden] with the condition-and-time embedding h [N, hidden] added."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x) + h)


class DiffLora(nn.Module):
    """The linear LoRA autoencoder (buffers) and the denoising MLP; `predict_batch` / `predict` as LoFA's."""

    def __init__(self, cfg: DiffLoraConfig, targets: list[tuple[str, int, int]], rank: int, alpha: float,
                 cond_dim: int, dim: int):
        super().__init__()
        self.cfg, self.targets, self.rank, self.alpha, self.cond_dim = cfg, targets, rank, alpha, cond_dim
        k, h = cfg.latent_dim, cfg.hidden
        self.register_buffer("mean", torch.zeros(dim))          # training LoRAs' mean vector [D]
        self.register_buffer("unit", torch.ones(dim))           # each coordinate's target RMS [D]
        self.register_buffer("components", torch.zeros(k, dim))  # principal directions [k, D]
        self.register_buffer("latent_scale", torch.ones(k))     # std of each latent over the training LoRAs [k]
        self.inp = nn.Linear(k, h)
        self.cond = nn.Linear(cond_dim, h)
        self.time = nn.Linear(h, h)
        self.blocks = nn.ModuleList(Block(h) for _ in range(cfg.depth))
        self.out = nn.Linear(h, k)

    def velocity(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """z [N, k] noisy standardised latents, t [N] in [0, 1], cond [N, Dc] pooled conditions -> velocity [N, k]."""
        half = self.cfg.hidden // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=z.device) / half)
        angles = 1000.0 * t[:, None] * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos(), torch.zeros(len(t), self.cfg.hidden - 2 * half,
                                                                 device=z.device)], dim=1)
        h = self.cond(cond) + self.time(emb)
        x = self.inp(z)
        for block in self.blocks:
            x = block(x, h)
        return self.out(x)

    def encode(self, vectors: Tensor) -> Tensor:
        """LoRA vectors [N, D] -> standardised latents [N, k]."""
        return ((vectors - self.mean) / self.unit) @ self.components.T / self.latent_scale

    def decode(self, z: Tensor) -> Tensor:
        """Standardised latents [N, k] -> LoRA vectors [N, D]."""
        return (z * self.latent_scale) @ self.components * self.unit + self.mean

    def to_lora(self, vector: Tensor) -> LoraWeights:
        """A LoRA vector [D] -> {name: LoraFactor(A [r, in], B [out, r], alpha)}."""
        lora, at = {}, 0
        for name, out_f, in_f in self.targets:
            a = vector[at: at + self.rank * in_f].reshape(self.rank, in_f)
            at += self.rank * in_f
            b = vector[at: at + out_f * self.rank].reshape(out_f, self.rank)
            at += out_f * self.rank
            lora[name] = LoraFactor(A=a.float(), B=b.float(), alpha=self.alpha)
        return lora

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def predict_batch(self, tokens: Tensor, mask: Tensor | None = None) -> list[LoraWeights]:
        """N conditions, tokens [N, K, Dc] (or [K, Dc]), mask [N, K] -> N sampled LoraWeights."""
        if tokens.ndim == 2:
            tokens, mask = tokens[None], None if mask is None else mask[None]
        if tokens.shape[-1] != self.cond_dim:
            raise LofaError(f"condition tokens are {tokens.shape[-1]} wide; this DiffLoRA-style model was trained on "
                            f"{self.cond_dim}-wide conditions")
        cond = pool_condition(tokens, mask).float().to(self.device)
        g = torch.Generator().manual_seed(self.cfg.sample_seed)
        z = torch.randn(1, self.cfg.latent_dim, generator=g).expand(len(cond), -1).to(self.device)
        grid = torch.linspace(1.0, 0.0, self.cfg.sample_steps + 1)
        for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            z = z + (t_next - t) * self.velocity(z, torch.full((len(z),), t, device=self.device), cond)
        return [self.to_lora(v) for v in self.decode(z)]

    def predict(self, tokens: Tensor, mask: Tensor | None = None) -> LoraWeights:
        """One condition, tokens [K, Dc] or [1, K, Dc] -> LoraWeights."""
        return self.predict_batch(tokens, mask)[0]

    def save_pretrained(self, directory: str | Path) -> None:
        """directory/diff_lora.safetensors and directory/config.json (written last)."""
        directory = Path(directory)
        save_safetensors(self.state_dict(), directory / WEIGHTS_FILE)
        write_json(directory / CONFIG_FILE, {"method": METHOD, "config": dataclasses.asdict(self.cfg),
                                             "targets": self.targets, "rank": self.rank, "alpha": self.alpha,
                                             "cond_dim": self.cond_dim, "dim": int(self.mean.numel())})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "DiffLora":
        from safetensors.torch import load_file

        meta = read_json(Path(directory) / CONFIG_FILE)
        if meta is None or meta.get("method") != METHOD:
            raise LofaError(f"{directory} holds no DiffLoRA-style model ({CONFIG_FILE} missing or of another method)")
        model = cls(DiffLoraConfig(**meta["config"]), [tuple(t) for t in meta["targets"]], meta["rank"],
                    meta["alpha"], meta["cond_dim"], meta["dim"])
        model.load_state_dict(load_file(Path(directory) / WEIGHTS_FILE))
        return model.to(device).eval()


def lora_vectors(data, case_ids) -> Tensor:
    """The LoRAs of `case_ids` as vectors [N, D]: per target (zoo order) A [r, in] then B [out, r], flattened."""
    rows = torch.tensor([data.row[c] for c in case_ids])
    parts = []
    for name in data.spec.names:
        parts += [data.A[name][rows].flatten(1), data.B[name][rows].flatten(1)]
    return torch.cat(parts, dim=1).float()


def train_diff_lora(data, cfg: DiffLoraConfig, seed: int = 0, device: str = "cpu", progress: bool = True
                    ) -> tuple[DiffLora, list[float]]:
    """Fit the autoencoder (PCA of the training LoRAs) and train the latent diffusion model on `data` (a Triplets:
    its train cases, their LoRAs and train-split conditions) -> (model in eval mode, the loss of every step)."""
    ids = data.train_ids
    if cfg.latent_dim > len(ids) - 1:
        raise LofaError(f"DiffLoraConfig.latent_dim {cfg.latent_dim} needs more than {len(ids)} training LoRAs; lower "
                        f"it to at most {len(ids) - 1}")
    x = lora_vectors(data, ids).double()
    targets = [(name, *data.spec.targets[t].shape) for t, name in enumerate(data.spec.names)]
    with torch.random.fork_rng(devices=[]):  # the MLP's initial weights from `seed`, whatever the global RNG holds
        torch.manual_seed(seed)
        model = DiffLora(cfg, targets, data.rank, data.alpha_value, data.cond_dim, x.shape[1])
    mean = x.mean(0)
    unit, at = torch.empty_like(mean), 0
    for _, out_f, in_f in targets:  # one unit per target: its RMS deviation from the mean over the training zoo
        for size in (data.rank * in_f, out_f * data.rank):
            unit[at: at + size] = (x[:, at: at + size] - mean[at: at + size]).pow(2).mean().sqrt().clamp_min(1e-12)
            at += size
    _, _, vh = torch.linalg.svd((x - mean) / unit, full_matrices=False)
    model.mean.copy_(mean.float())
    model.unit.copy_(unit.float())
    model.components.copy_(vh[: cfg.latent_dim].float())
    latents = ((x - mean) / unit).float() @ model.components.T
    model.latent_scale.copy_(latents.std(0).clamp_min(1e-8))
    model.to(device)
    z_all = (latents / model.latent_scale.cpu()).to(device)

    bank = data.conditions("train")
    tokens, mask = bank.get(ids * bank.views, torch.arange(bank.views).repeat_interleave(len(ids)))
    pooled = pool_condition(tokens, mask).float().view(bank.views, len(ids), -1).to(device)
    g = torch.Generator().manual_seed(seed)

    def loss(step: int) -> Tensor:
        i = torch.randint(len(ids), (cfg.batch_size,), generator=g)
        v = torch.randint(bank.views, (cfg.batch_size,), generator=g)
        t = torch.rand(cfg.batch_size, generator=g)
        noise = torch.randn(cfg.batch_size, cfg.latent_dim, generator=g)
        z = z_all[i.to(device)]
        t_d, noise = t.to(device), noise.to(device)
        noisy = (1 - t_d[:, None]) * z + t_d[:, None] * noise
        return F.mse_loss(model.velocity(noisy, t_d, pooled[v.to(device), i.to(device)]), noise - z)

    losses = one_cycle(model, loss, cfg.steps, lr=cfg.lr, weight_decay=0.0, clip=1.0, what="DiffLoRA-style diffusion",
              fix="lower DiffLoraConfig.lr and rerun", desc="DiffLoRA-style diffusion", progress=progress)
    return model.eval(), losses
