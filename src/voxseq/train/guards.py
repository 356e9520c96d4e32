"""Numerical faults in training: a step whose loss or gradient norm is not finite is skipped (no
optimiser update), logged, and the run stops after ``limit`` such steps in a row, with its last good
checkpoint left as it was."""

from __future__ import annotations

import math

import torch

from voxseq import VoxseqError


def clip_gradients(params, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0: no clipping) and return the norm before clipping
    (global across ranks for DDP and FSDP2, so every rank sees the same number)."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0


class NonFiniteGuard:
    def __init__(self, limit: int, run_dir=None):
        self.limit, self.run_dir, self.in_a_row, self.total = limit, run_dir, 0, 0

    def should_skip(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when this step must not update the weights; raises after ``limit`` bad steps in a row.

        ``loss`` and ``grad_norm`` must be the same on every rank (all-reduced loss, global norm), so all
        ranks skip together."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.limit:
            from voxseq.checkpoint import latest_checkpoint

            last = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
            kept = f"; the last good checkpoint is {last}" if last is not None else ""
            raise VoxseqError(f"step {step}: {self.in_a_row} non-finite losses or gradients in a row "
                              f"(max_nonfinite_steps={self.limit}); stopped{kept}. Lower the learning rate "
                              "or check the data")
        return True


__all__ = ["NonFiniteGuard", "clip_gradients"]
