"""Eval: benchmarks, metrics (pass@k, maj@k by meaning, best-of-N) and the eval stage (`eval.run.evaluate`)."""

from budget_reasoner.eval.metrics import Vote, majority, majority_correct

__all__ = ["Vote", "majority", "majority_correct"]
