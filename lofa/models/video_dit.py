"""The video base generator: diffusers' WanTransformer3DModel (the Wan2.1 architecture), in pixel space.

The mini worlds have no VAE, so the DiT patchifies RGB clips [N, 3, T, H, W] directly; a (2, 4, 4) patch turns an
8×32×32 clip into 4·8·8 = 256 tokens. The `wan` preset is the real Wan2.1-T2V-1.3B configuration (latent space,
umT5 text states), for users who point the package at local weights or benchmark at paper shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections


@dataclass
class VideoDiTConfig:
    """The shape of the video base generator, a diffusers WanTransformer3DModel (`make_video_dit`); the `wan` preset
    is Wan2.1-T2V-1.3B."""

    patch_size: tuple[int, int, int] = field(default=(2, 4, 4), metadata={
        "help": "(t, h, w) size of the patches the patch embedding cuts a clip into, one token each."})
    num_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_heads: int = field(default=2, metadata={
        "help": "Attention heads of every block; the model width is num_heads · head_dim."})
    head_dim: int = field(default=64, metadata={"help": "Channels of each attention head."})
    ffn_dim: int = field(default=512, metadata={"help": "Hidden width of every block's feed-forward network."})
    in_channels: int = field(default=3, metadata={
        "help": "Channels of the noisy input clip (3: RGB pixels; Wan: 16 latent channels), position planes not "
                "counted."})
    out_channels: int = field(default=3, metadata={"help": "Channels of the output clip."})
    text_dim: int = field(default=384, metadata={
        "help": "Width of the text token states (MiniLM: 384; Wan2.1 uses umT5-XXL: 4096)."})
    freq_dim: int = field(default=256, metadata={"help": "Width of the sinusoidal timestep embedding."})
    cross_attn_norm: bool = field(default=True, metadata={
        "help": "A LayerNorm (with affine weights) on the hidden states before cross-attention, as in Wan."})
    qk_norm: str = field(default="rms_norm_across_heads", metadata={
        "help": "Normalisation of queries and keys (diffusers' WanTransformer3DModel qk_norm; Wan's is "
                "'rms_norm_across_heads')."})
    rope_max_seq_len: int = field(default=1024, metadata={
        "help": "Positions per axis (t, h, w) that the rotary embedding has frequencies for."})
    zero_init_output: bool = field(default=True, metadata={
        "help": "Zero the output projection at initialisation (DiT-style), so the untrained net outputs 0 and "
                "early training is stable."})
    prediction: str = field(default="x0", metadata={
        "help": "What the net outputs: 'x0', the clean clip (pixel-space models; the Generator turns it into a "
                "velocity), or 'velocity' (Wan)."})
    position_channels: int = field(default=0, metadata={
        "help": "Input planes of absolute coordinates in [-1, 1] added to the clip, 0 to 3: the last this many of "
                "(t, y, x) (Generator._with_positions)."})

    PRESETS = {
        "smoke": {"num_layers": 2, "num_heads": 2, "head_dim": 32, "ffn_dim": 128},
        "mini": {},
        # full: twice mini's depth (2.4 M parameters, 4.7 MiB in bfloat16): the shipped full bases of the three tasks
        # and their evaluators must fit beside the mini set in data/pretrained/'s 120 MiB
        "full": {"num_layers": 8},
        "wan": {"patch_size": (1, 2, 2), "num_layers": 30, "num_heads": 12, "head_dim": 128, "ffn_dim": 8960,
                "in_channels": 16, "out_channels": 16, "text_dim": 4096, "zero_init_output": False,
                "prediction": "velocity"},
    }

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)  # JSON / YAML round trips give lists
        if self.position_channels not in (0, 1, 2, 3):
            raise ValueError(f"position_channels must be 0-3 (t, y, x planes); got {self.position_channels}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


VideoDiTConfig.PRESETS["paper"] = VideoDiTConfig.PRESETS["wan"]


def make_video_dit(cfg: VideoDiTConfig):
    """A freshly initialised WanTransformer3DModel for `cfg` (hidden_states layout [N, C, T, H, W])."""
    from diffusers import WanTransformer3DModel

    net = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels + cfg.position_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm=cfg.qk_norm,
        rope_max_seq_len=cfg.rope_max_seq_len,
    )
    if cfg.zero_init_output:
        torch.nn.init.zeros_(net.proj_out.weight)
        torch.nn.init.zeros_(net.proj_out.bias)
    return net


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [N, S, H, D] by complex freqs [1, S, 1, D/2] (in float32)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


class WanRopeAttnProcessor(WanAttnProcessor):
    """diffusers' WanAttnProcessor with the rotary embedding applied as one complex multiply (as the original Wan
    code does). Same math and weights; diffusers' strided real-valued version dominated CPU step time (≈3×).
    Image-conditioned (I2V) attention falls back to the diffusers processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        # the norms in at least float32 (their weights' dtype): under bf16 autocast the projections come out bf16,
        # and rms_norm of a bf16 input with float32 weights takes torch's unfused path with a warning
        wide = torch.promote_types(query.dtype, torch.float32)
        query, key = attn.norm_q(query.to(wide)).type_as(query), attn.norm_k(key.to(wide)).type_as(key)
        query, key, value = (y.unflatten(2, (attn.heads, -1)) for y in (query, key, value))
        if rotary_emb is not None:
            freqs_cos, freqs_sin = rotary_emb  # [1, S, 1, D], each frequency repeated for its channel pair
            freqs = torch.complex(freqs_cos[..., 0::2].float(), freqs_sin[..., 1::2].float())
            query, key = _rope(query, freqs), _rope(key, freqs)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False, backend=self._attention_backend)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def use_fast_rope(net) -> None:
    """Install WanRopeAttnProcessor on every attention module of a WanTransformer3DModel (in place)."""
    net.set_attn_processor(WanRopeAttnProcessor())


def config_from_wan(net_config: dict) -> VideoDiTConfig:
    """VideoDiTConfig describing a loaded diffusers Wan transformer (its `config.json` dict)."""
    return VideoDiTConfig(
        patch_size=tuple(net_config["patch_size"]),
        num_layers=net_config["num_layers"],
        num_heads=net_config["num_attention_heads"],
        head_dim=net_config["attention_head_dim"],
        ffn_dim=net_config["ffn_dim"],
        in_channels=net_config["in_channels"],
        out_channels=net_config["out_channels"] or net_config["in_channels"],
        text_dim=net_config["text_dim"],
        freq_dim=net_config["freq_dim"],
        cross_attn_norm=net_config["cross_attn_norm"],
        qk_norm=net_config["qk_norm"],
        rope_max_seq_len=net_config["rope_max_seq_len"],
        zero_init_output=False,
        prediction="velocity",
    )

