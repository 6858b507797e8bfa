"""What the embedded models understand, and a notice for prompts with words they never saw."""
from __future__ import annotations

from . import emoji, scenes


def unknown_words(prompt: str, model: str) -> list[str]:
    """Words of `prompt` embedded model `model` ("emoji" or "shapes") never saw in training, in order, once."""
    if model == "shapes":
        return scenes.unknown_words(prompt)
    known = set(emoji.vocabulary())
    return list(dict.fromkeys(w for w in emoji.words(prompt) if w.isalnum() and w not in known))


def notice(prompt: str, model: str) -> str:
    """Markdown: the words of `prompt` the model does not know, and what it does ("" when it knows them all)."""
    unknown = unknown_words(prompt, model)
    if not unknown:
        return ""
    head = f"The {model} model does not know: *{', '.join(unknown)}*."
    if model == "shapes":
        return f"{head} It understands: {', '.join(scenes.vocabulary())}."
    near = list(dict.fromkeys(c for w in unknown for c in emoji.suggestions(w)))
    tail = f" Nearest captions it knows: {', '.join(f'“{c}”' for c in near)}." if near else ""
    return f"{head} It draws {len(emoji.captions()):,} emoji by their Unicode names.{tail}"
