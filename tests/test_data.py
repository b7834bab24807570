"""Tests for data.py: video io, transforms, readers, collate, prompts, corpus, synthetic language."""

# ============================================================================ core


# ============================================================================ synthetic
