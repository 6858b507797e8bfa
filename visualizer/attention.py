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
averaged. DAAM sums raw maps over layers instead; on the embedded model the 16x16 layers are nearly
uniform and a raw sum washes out the 8x8 layers' sharp placement of the shape word.
"""
from __future__ import annotations

from pathlib import Path

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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


# ---- what a person sees: per-token heatmaps, their share of attention, exports ---------------------------

def token_index(run, word: str) -> int:
    """The position of `word` among the run's word-map tokens, or a SettingsError listing them."""
    from .errors import SettingsError

    tokens = (run.info.attention or {}).get("tokens")
    if not tokens:
        raise SettingsError("This run has no word maps: generate it with attention on (--attention).")
    if word not in tokens:
        raise SettingsError(f"{word!r} is not a token of this prompt; its tokens are: {', '.join(tokens)}.")
    return tokens.index(word)


def heat_frames(run, index: int) -> list[np.ndarray]:
    """Token `index`'s combined map at every step as a heatmap (each step scaled to its own maximum)."""
    from .insight import heat

    return [heat(m.numpy()) for m in run.tensors["attention"][:, index]]


def aggregate_heat(run, index: int) -> np.ndarray:
    """Token `index`'s map summed over all steps (what DAAM shows), as a heatmap."""
    from .insight import heat

    return heat(run.tensors["attention"][:, index].sum(0).numpy())


def shares(run) -> list[list[float]]:
    """Per step, each token's share of the cross-attention the prompt's words get (raw maps, all resolutions)."""
    names = [k for k in run.tensors if k.startswith("attention_")]
    mass = sum(run.tensors[k].mean(dim=(2, 3)) for k in names) / len(names)  # [steps, tokens]
    return (mass / mass.sum(1, keepdim=True).clamp_min(1e-12)).tolist()


def overlay(frame: np.ndarray, heatmap: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """`heatmap` (any size) laid over `frame` with `opacity`, where the map is bright."""
    size = (frame.shape[1], frame.shape[0])
    hot = np.asarray(Image.fromarray(heatmap).resize(size, Image.Resampling.BILINEAR), np.float32)
    alpha = opacity * hot.max(axis=2, keepdims=True) / 255
    return (frame * (1 - alpha) + hot * alpha).astype(np.uint8)


def export_token(run, folder, word: str, view: str = "x0", fps: float = 8) -> dict[str, Path]:
    """attention-WORD.gif (the word's map over the frames, every step) and attention-WORD-sheet.png."""
    from .export import contact_sheet, prepare, save_gif, step_label, view_frames

    index = token_index(run, word)
    frames = [overlay(f, h) for f, h in zip(view_frames(run, view), heat_frames(run, index))]
    labels = [f"{word} · {step_label(s, len(run))}" for s in run.steps]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gif = save_gif(prepare(frames, labels), folder / f"attention-{word}.gif", fps=fps)
    sheet = folder / f"attention-{word}-sheet.png"
    contact_sheet(frames, labels).save(sheet)
    return {"gif": gif, "sheet": sheet}
