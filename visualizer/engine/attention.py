"""Which word paints where: per-token attention maps of the denoiser, captured at every step.

`AttentionRecorder` installs a processor on every layer where image and text meet that leaves the layer's own
computation untouched (so the image is bit-identical) and, beside it, computes the attention probabilities
softmax(QK^T / sqrt(d)) of the conditional branch explicitly (SDPA never materialises them), averaged over heads:
- a UNet's cross-attention layers (`attn2`): image queries over the text keys;
- an MMDiT's joint attention (SD 3's blocks, Flux's double-stream blocks), where image and text tokens attend to
  each other in one softmax: the image queries' attention to the text keys, read from the very queries and keys
  the layer hands to scaled_dot_product_attention (after its q/k norms and, for Flux, its rotary positions).
A step keeps the maps of its first model evaluation (as x0-hat does), per resolution (layers of one resolution
averaged; a transformer has one, its patch grid) and combined on the latent grid.

Combined weighting: each resolution's map of a token is divided by its spatial mean and only what stands
above that mean is kept (a layer that spreads a word evenly adds nothing), then the resolutions are
averaged. DAAM sums raw maps over layers instead; on the shapes model the 16x16 layers are nearly
uniform and a raw sum washes out the 8x8 layers' sharp placement of the shape word.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F


class _CrossAttentionProcessor:
    """Runs the layer's original processor, and records the conditional rows' head-averaged attention."""

    def __init__(self, original, recorder: "AttentionRecorder"):
        self.original, self.recorder = original, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows = self.recorder.rows
        if rows and encoder_hidden_states is not None:
            picked = [row for _, row in rows]
            query = attn.head_to_batch_dim(attn.to_q(hidden_states[picked]))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states[picked]))
            probs = attn.get_attention_scores(query, key, None)  # [rows * heads, queries, tokens]
            probs = probs.reshape(len(picked), attn.heads, *probs.shape[1:]).mean(1)
            self.recorder.add(probs)
        return out


class _JointAttentionProcessor:
    """Runs an MMDiT layer's original processor, and records the conditional rows' head-averaged attention of the
    image queries to the text keys (the share of each image token's one softmax that goes to each text token)."""

    def __init__(self, original, recorder: "AttentionRecorder", text_first: bool):
        self.original, self.recorder, self.text_first = original, recorder, text_first

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        rows = [row for _, row in self.recorder.rows]
        if not rows or encoder_hidden_states is None:  # Flux's single-stream blocks: text and image already joined
            return self.original(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        images, texts = hidden_states.shape[1], encoder_hidden_states.shape[1]
        image = slice(texts, texts + images) if self.text_first else slice(0, images)
        text = slice(0, texts) if self.text_first else slice(images, images + texts)
        sdpa, caller = F.scaled_dot_product_attention, threading.get_ident()

        def recording(query, key, value, *a, **kw):  # [batch, heads, tokens, head dim], as SDPA takes them
            if threading.get_ident() == caller:
                scale = kw.get("scale") or 1 / math.sqrt(query.shape[-1])
                q, k = query[rows][:, :, image].float(), key[rows].float()
                probs = sum((q[:, h] @ k[:, h].transpose(1, 2) * scale).softmax(-1)[..., text]
                            for h in range(q.shape[1]))  # one head at a time: a real model's maps are large
                self.recorder.add(probs / q.shape[1])
            return sdpa(query, key, value, *a, **kw)

        F.scaled_dot_product_attention = recording  # looked up at call time by the processors
        try:
            return self.original(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            F.scaled_dot_product_attention = sdpa


class AttentionRecorder:
    """Collects, for the rows asked before each denoiser call, the mean map per resolution over its layers.
    `joint`: None for a UNet (cross-attention layers), else an MMDiT's token order in its joint attention,
    "image_first" (SD 3) or "text_first" (Flux)."""

    def __init__(self, denoiser, joint: str | None = None):
        self.denoiser, self.joint = denoiser, joint
        self.rows: list[tuple[int, int]] = []  # (sampler index, batch row of its conditional branch)
        self._sums: dict[int, torch.Tensor] = {}  # queries (h * w of a resolution) -> sum over layers
        self._counts: dict[int, int] = {}
        self._original = dict(denoiser.attn_processors)

    def _wrap(self, name: str, processor):
        if self.joint is None:
            return _CrossAttentionProcessor(processor, self) if name.endswith("attn2.processor") else processor
        if name.endswith(".attn.processor"):
            return _JointAttentionProcessor(processor, self, text_first=self.joint == "text_first")
        return processor

    def __enter__(self) -> "AttentionRecorder":
        self.denoiser.set_attn_processor({name: self._wrap(name, p) for name, p in self._original.items()})
        return self

    def __exit__(self, *exc) -> None:
        self.denoiser.set_attn_processor(self._original)

    def add(self, probs: torch.Tensor) -> None:
        queries = probs.shape[1]
        self._sums[queries] = self._sums.get(queries, 0) + probs.float()
        self._counts[queries] = self._counts.get(queries, 0) + 1

    def collect(self, latent_hw: tuple[int, int]) -> dict[int, dict[int, torch.Tensor]]:
        """Per sampler index: {resolution height: [tokens, h_r, w_r]} for the rows of the last call; resets."""
        h, w = latent_hw
        out: dict[int, dict[int, torch.Tensor]] = {index: {} for index, _ in self.rows}
        for queries, total in self._sums.items():
            scale = round((h * w / queries) ** 0.5)
            mean = (total / self._counts[queries]).reshape(len(self.rows), h // scale, w // scale, -1)
            for k, (index, _) in enumerate(self.rows):
                out[index][h // scale] = mean[k].permute(2, 0, 1)
        self._sums, self._counts, self.rows = {}, {}, []
        return out


def combine(per_resolution: dict[int, torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """[tokens, h, w] on the latent grid from {resolution: [tokens, h_r, w_r]} (see the module docstring)."""
    parts = []
    for maps in per_resolution.values():
        relative = maps / maps.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12) - 1
        parts.append(F.interpolate(relative.clamp_min(0)[None], size=latent_hw, mode="bilinear",
                                   align_corners=False)[0])
    return torch.stack(parts).mean(0)


def centroid(attention_map: torch.Tensor) -> tuple[float, float]:
    """Mass centroid (x, y) of a non-negative [h, w] map, as fractions of the width and height."""
    m = attention_map.clamp_min(0).float()
    total = m.sum().clamp_min(1e-12)
    h, w = m.shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    return float((m.sum(0) * xs).sum() / total), float((m.sum(1) * ys).sum() / total)
