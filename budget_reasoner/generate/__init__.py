"""Rejection sampling: teacher chains kept when the verifier accepts them, and preference pairs."""

from budget_reasoner.generate.pipeline import build_pairs, build_sft_rows, generate

__all__ = ["generate", "build_pairs", "build_sft_rows"]
