"""Loss over one or more targets, with missing labels masked out.

Per task k, L_k is the mean error over the samples that have a label for k.  The total is

- fixed weights:   L = sum_k lambda_k L_k
- uncertainty:     L = sum_k ( 0.5 exp(-s_k) L_k + 0.5 s_k ),  s_k = log sigma_k^2 learned
  (homoscedastic task uncertainty; Kendall, Gal and Cipolla, 2018)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

_BASE = {"l1": nn.functional.l1_loss, "mse": nn.functional.mse_loss, "huber": nn.functional.smooth_l1_loss}


class MultiTaskLoss(nn.Module):
    def __init__(
        self, n_tasks: int = 1, weights: Optional[Sequence[float]] = None, weighting: str = "fixed", base: str = "l1"
    ) -> None:
        super().__init__()
        if weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"task weighting {weighting!r}: allowed fixed, uncertainty")
        if base not in _BASE:
            raise ValueError(f"loss {base!r}: allowed {', '.join(_BASE)}")
        self.n_tasks, self.weighting, self.base = n_tasks, weighting, _BASE[base]
        w = torch.ones(n_tasks) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (n_tasks,):
            raise ValueError(f"{len(w)} task weights for {n_tasks} tasks")
        self.register_buffer("weights", w)
        self.log_var = nn.Parameter(torch.zeros(n_tasks)) if weighting == "uncertainty" else None

    def task_losses(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(n_tasks,) mean loss of each task over its labelled samples (0 where none)."""
        target = target.view(pred.shape)
        mask = torch.isfinite(target)
        losses = []
        for k in range(self.n_tasks):
            m = mask[:, k]
            if m.any():
                losses.append(self.base(pred[m, k], target[m, k]))
            else:
                losses.append(pred.sum() * 0.0)
        return torch.stack(losses)

    def effective_weights(self) -> torch.Tensor:
        if self.log_var is None:
            return self.weights
        return 0.5 * torch.exp(-self.log_var.detach())

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.task_losses(pred, target)
        if self.log_var is None:
            return (self.weights * losses).sum()
        return (0.5 * torch.exp(-self.log_var) * losses + 0.5 * self.log_var).sum()
