"""The one training loop for every torch model of matfusion.

Per epoch: one pass over the training graphs (AdamW, cosine LR, gradient clipping), then the
MAE on the inner validation part (in target units), then a report with a checkpoint.  Under
Ray Tune the report is ``ray.tune.report(metrics, checkpoint=...)`` and a restarted trial
resumes from ``ray.tune.get_checkpoint()``; outside Tune (tests, refits) a
:class:`LocalSession` keeps the history in memory.  The checkpoint always carries the best
weights so far (by validation MAE): that is the model the trial stands for.

Early stopping uses the inner validation part only; a NaN/inf loss ends the trial with a
clear error.
"""
from __future__ import annotations

import copy
import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

CHECKPOINT_FILE = "state.pt"


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(prefer: Optional[str] = None) -> torch.device:
    """CUDA when present (Ray sets CUDA_VISIBLE_DEVICES per trial), else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoopSettings:
    max_epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 64
    clip_norm: float = 5.0
    patience: int = 20
    loss: str = "l1"
    seed: int = 0
    device: Optional[str] = None


class LocalSession:
    """Report sink outside Ray Tune: keeps every metrics dict and the last checkpoint state."""

    def __init__(self, resume_state: Optional[dict] = None) -> None:
        self.history: list[dict] = []
        self.last_state: Optional[dict] = None
        self._resume = resume_state

    def get_state(self) -> Optional[dict]:
        return self._resume

    def report(self, metrics: dict, state: dict) -> None:
        self.history.append(dict(metrics))
        self.last_state = state


def write_torch_state(state: dict, directory: str) -> None:
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))


class TuneSession:
    """Reports to Ray Tune with a checkpoint directory written by ``write(state, dir)``
    (default: ``state.pt`` via ``torch.save``).  The only place matfusion talks to Tune."""

    def __init__(self, write: Callable[[dict, str], None] = write_torch_state) -> None:
        self.write = write

    def get_state(self) -> Optional[dict]:
        from ray import tune

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)

    def report(self, metrics: dict, state: dict) -> None:
        from ray import tune

        with tempfile.TemporaryDirectory() as d:
            self.write(state, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _loss_fn(name: str) -> Callable:
    return {"l1": nn.functional.l1_loss, "mse": nn.functional.mse_loss,
            "huber": nn.functional.smooth_l1_loss}[name]


def _to_cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def predict(model: nn.Module, data_list: list, y_mean: np.ndarray, y_std: np.ndarray,
            batch_size: int = 256, device: Optional[torch.device] = None) -> np.ndarray:
    """Predictions in target units, shape (n, n_targets)."""
    from torch_geometric.loader import DataLoader

    device = device or next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for batch in DataLoader(data_list, batch_size=batch_size, shuffle=False):
            out.append(model(batch.to(device)).cpu().numpy())
    pred = np.concatenate(out, axis=0) if out else np.zeros((0, len(y_mean)))
    return pred * y_std + y_mean


def train_torch_model(model: nn.Module, train_list: list, val_list: list, settings: LoopSettings,
                      session=None, extra_metrics: Optional[dict] = None) -> dict:
    """Train ``model`` on ``train_list`` (PyG Data with ``y``), select on ``val_list``.

    Returns the final state dict (``best_model`` weights, ``best_val_mae``, ``y_mean``...).
    """
    from torch_geometric.loader import DataLoader

    session = session or LocalSession()
    device = pick_device(settings.device)
    model.to(device)
    y_train = torch.cat([d.y for d in train_list]).numpy().astype(np.float64)
    y_mean = y_train.mean(axis=0)
    y_std = y_train.std(axis=0)
    y_std[y_std == 0] = 1.0
    y_val = torch.cat([d.y for d in val_list]).numpy().astype(np.float64)

    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, settings.max_epochs), eta_min=settings.lr * 0.01)
    gen = torch.Generator().manual_seed(settings.seed)
    loss_fn = _loss_fn(settings.loss)
    mean_t = torch.tensor(y_mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(y_std, dtype=torch.float32, device=device)

    start_epoch, best_val, best_epoch, best_weights = 1, float("inf"), 0, None
    resume = session.get_state()
    if resume is not None:
        model.load_state_dict(resume["model"])
        # a copy: Optimizer.load_state_dict keeps the given tensors, so training would otherwise
        # mutate the caller's checkpoint state (a second resume from it would then differ)
        opt.load_state_dict(copy.deepcopy(resume["optimizer"]))
        sched.load_state_dict(resume["scheduler"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        start_epoch = resume["epoch"] + 1
        best_val, best_epoch, best_weights = resume["best_val_mae"], resume["best_epoch"], resume["best_model"]

    loader = DataLoader(train_list, batch_size=settings.batch_size, shuffle=True, generator=gen, drop_last=False)
    state = resume
    for epoch in range(start_epoch, settings.max_epochs + 1):
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            batch = batch.to(device)
            opt.zero_grad()
            pred = model(batch)
            target = (batch.y.view(pred.shape) - mean_t) / std_t
            loss = loss_fn(pred, target)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"training loss became {loss.item()} at epoch {epoch} (lr={settings.lr}); "
                    "the trial is stopped: lower the learning rate or check the targets for extreme values"
                )
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
            opt.step()
            total += loss.item() * batch.num_graphs
            count += batch.num_graphs
        sched.step()
        train_loss = total / max(count, 1)

        val_pred = predict(model, val_list, y_mean, y_std, device=device)
        val_mae = float(np.mean(np.abs(val_pred - y_val.reshape(val_pred.shape))))
        if not np.isfinite(val_mae):
            raise NonFiniteLossError(f"validation MAE became {val_mae} at epoch {epoch}")
        if val_mae < best_val:
            best_val, best_epoch, best_weights = val_mae, epoch, _to_cpu(model.state_dict())
        finished = epoch >= settings.max_epochs or epoch - best_epoch >= settings.patience
        metrics = {
            "epoch": epoch, "train_loss": train_loss, "val_mae": val_mae, "best_val_mae": best_val,
            "lr": opt.param_groups[0]["lr"], "trial_finished": bool(finished),
            **(extra_metrics or {}),
        }
        state = {
            "model": _to_cpu(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
            "scheduler": sched.state_dict(), "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "epoch": epoch, "best_val_mae": best_val,
            "best_epoch": best_epoch, "best_model": best_weights,
            "y_mean": y_mean, "y_std": y_std,
        }
        session.report(metrics, state)
        if finished:
            break
    if best_weights is not None:
        model.load_state_dict(best_weights)
    return state
