"""Colour emoji with their Unicode names: the emoji model's training data and its scorer.

The images come from Noto Color Emoji (Debian: `apt-get install -y fonts-noto-color-emoji`), every
single-codepoint emoji the font draws in `RANGES`, composited on white. A caption is the emoji's
Unicode name in lower case ("red apple", "smiling face with sunglasses"). `nearest` scores a generated
image by the training emoji closest to it, so prompt adherence is measured without a human.
"""
from __future__ import annotations

import colorsys
import difflib
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only size at which this bitmap font draws
CELL = (136, 128)  # the font's glyph cell (width, height) at FONT_SIZE
RANGES = ((0x1F300, 0x1F64F), (0x1F680, 0x1F6D7), (0x1F90C, 0x1F9FF), (0x2600, 0x27BF))
IMAGE_SIZE = 64
SCORE_SIZE = 32  # images are compared at this size (RGB on white)
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")  # CLIP's pre-tokenisation, for lower-case ASCII text


class FontMissing(RuntimeError):
    """The emoji font is not installed."""


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    if not FONT_PATH.exists():
        raise FontMissing(f"{FONT_PATH} is missing: install it with `apt-get install -y fonts-noto-color-emoji`.")
    return ImageFont.truetype(str(FONT_PATH), FONT_SIZE)


@lru_cache(maxsize=1)
def emoji() -> tuple[tuple[str, str], ...]:
    """(character, caption) for every emoji the font draws in RANGES, skin-tone modifiers excluded, in code
    point order."""
    font, out = _font(), []
    for first, last in RANGES:
        for code in range(first, last + 1):
            char = chr(code)
            try:
                caption = unicodedata.name(char).lower()
            except ValueError:
                continue
            if caption.startswith("emoji modifier") or font.getmask(char).getbbox() is None:
                continue
            out.append((char, caption))
    return tuple(out)


def captions() -> list[str]:
    return [caption for _, caption in emoji()]


def words(text: str) -> list[str]:
    """The words of `text` as the tokenizer splits them ("jack-o-lantern" -> jack, -, o, -, lantern)."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Every word of every caption, once, in order of first use."""
    return tuple(dict.fromkeys(w for caption in captions() for w in words(caption) if w.isalnum()))


def render(char: str, size: int = IMAGE_SIZE) -> Image.Image:
    """One emoji, centred on a white square, `size` pixels wide."""
    glyph = Image.new("RGBA", CELL, (255, 255, 255, 0))
    ImageDraw.Draw(glyph).text((0, 0), char, font=_font(), embedded_color=True)
    side = max(CELL)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, ((side - CELL[0]) // 2, (side - CELL[1]) // 2))
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


@lru_cache(maxsize=2)
def images(size: int = IMAGE_SIZE, cache: Path | None = None) -> np.ndarray:
    """Every emoji as read-only uint8 [N, 3, size, size], in `emoji()` order; kept in memory, and as .npy in
    `cache` if given."""
    path = cache / f"emoji-{size}.npy" if cache else None
    if path and path.exists():
        out = np.load(path)
    else:
        out = np.ascontiguousarray(np.stack([np.asarray(render(char, size)) for char, _ in emoji()]).transpose(0, 3, 1, 2))
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, out)
    out.setflags(write=False)
    return out


def _score_space(pictures) -> np.ndarray:
    """Images (PIL or uint8 HWC arrays) -> float vectors at SCORE_SIZE, RGB in [0, 1]."""
    out = []
    for picture in pictures:
        image = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
        small = image.convert("RGB").resize((SCORE_SIZE, SCORE_SIZE), Image.BILINEAR)
        out.append(np.asarray(small, dtype=np.float32).reshape(-1) / 255.0)
    return np.stack(out)


@lru_cache(maxsize=1)
def _references() -> np.ndarray:
    return _score_space(render(char, SCORE_SIZE * 2) for char, _ in emoji())


def nearest(pictures, k: int = 5) -> np.ndarray:
    """Indices into `emoji()` of the `k` training emoji nearest each picture (RGB distance at 32x32 on white),
    nearest first: int [len(pictures), k]."""
    query, refs = _score_space(pictures), _references()
    distances = (query ** 2).sum(1, keepdims=True) - 2 * query @ refs.T + (refs ** 2).sum(1)
    return np.argsort(distances, axis=1)[:, :k]


def suggestions(word: str, limit: int = 3) -> list[str]:
    """Captions a person may have meant by `word`: those that hold it whole ("dog" -> "dog", "hot dog", "dog face"),
    shortest first, else those holding the known words closest to it in spelling ("dogs" -> the same)."""
    word = word.lower()
    known = [word] if word in vocabulary() else difflib.get_close_matches(word, vocabulary(), n=limit, cutoff=0.75)
    holding = [c for w in known for c in sorted((c for c in captions() if w in words(c)), key=len)]
    return list(dict.fromkeys(holding))[:limit]


COLOUR_GROUPS = ("red & pink", "orange & brown", "yellow", "green", "blue & purple", "grey & black")


def colour_group(image: np.ndarray) -> int:
    """Index into COLOUR_GROUPS of an emoji's main colour (uint8 [3, H, W] on white): the mean of its non-white
    pixels, by hue, or grey & black when that is unsaturated or dark."""
    pixels = image.reshape(3, -1).T.astype(np.float32) / 255.0
    ink = pixels[(1.0 - pixels).max(axis=1) > 0.15]
    hue, saturation, value = colorsys.rgb_to_hsv(*(ink.mean(axis=0) if len(ink) else pixels.mean(axis=0)))
    if saturation < 0.25 or value < 0.3:
        return 5
    degrees = hue * 360
    for index, upper in enumerate((15, 36, 70, 170, 330)):
        if degrees < upper:
            return index
    return 0  # hues past 330 are red again
