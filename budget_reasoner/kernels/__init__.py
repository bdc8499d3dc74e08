"""Fused losses (and, with their own issue, Triton kernels), each beside its PyTorch reference."""

from budget_reasoner.kernels.fused_loss import fused_linear_cross_entropy, fused_linear_kd_loss, linear_topk_logprobs

__all__ = ["fused_linear_cross_entropy", "fused_linear_kd_loss", "linear_topk_logprobs"]
