"""A word map as files: the token's map over the frames as a GIF and a contact sheet."""
from __future__ import annotations

from pathlib import Path

from ..analysis.word_maps import heat_frames, overlay, token_index
from ..engine.labels import step_label
from .export import contact_sheet, prepare, save_gif, view_frames


def export_token(run, folder, word: str, view: str = "x0", fps: float = 8) -> dict[str, Path]:
    """attention-WORD.gif (the word's map over the frames, every step) and attention-WORD-sheet.png."""
    index = token_index(run, word)
    frames = [overlay(f, h) for f, h in zip(view_frames(run, view), heat_frames(run, index))]
    labels = [f"{word} · {step_label(s, len(run))}" for s in run.steps]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gif = save_gif(prepare(frames, labels), folder / f"attention-{word}.gif", fps=fps)
    sheet = folder / f"attention-{word}-sheet.png"
    contact_sheet(frames, labels).save(sheet)
    return {"gif": gif, "sheet": sheet}
