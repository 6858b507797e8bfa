"""The embedded models: their training data (emoji, procedural shape scenes), architecture, training, scoring.

Importing it imports the engine first, for the engine's logging filter (no torchvision notice when diffusers loads).
"""
from .. import engine  # noqa: F401
