"""Tests for model.py, against tiny random transformers models built in the test."""

# ============================================================================ LLM


# ============================================================================ LoRA / Connector
