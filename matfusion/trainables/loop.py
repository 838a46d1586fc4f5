"""The one training loop for every torch model of matfusion.

Per epoch: one pass over the training graphs (AdamW, cosine LR, optionally
restarted at given epochs such as ASHA's rungs; gradient clipping), then the
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
import math
import os
import random
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

if TYPE_CHECKING:  # annotations only
    import torch
    from torch import nn

# torch is imported inside the functions that use it: a tabular trial (rf, et, lgbm) reports
# through the sessions below without paying torch's import in its Ray worker
CHECKPOINT_FILE = "state.pt"


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(prefer: Optional[str] = None) -> torch.device:
    """CUDA when present (Ray sets CUDA_VISIBLE_DEVICES per trial), else CPU."""
    import torch

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
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always has one)
    # training graphs (a fixed seeded subset) on which BatchNorm statistics are re-estimated
    # before every validation (0: keep the running averages); see refresh_batch_norm
    bn_refresh_graphs: int = 64
    # epochs after which the cosine schedule restarts (warm restarts, e.g. ASHA's rung milestones):
    # () = one cosine cycle over max_epochs
    lr_restarts: tuple = ()
    # epochs that always get a checkpoint (e.g. ASHA's rungs, where a trial may be paused)
    checkpoint_at: tuple = ()


def lr_cycles(max_epochs: int, restarts=()) -> list[tuple[int, int]]:
    """The cosine cycles ``[(start, end), ...]`` (epochs, end exclusive as 0-based epoch indices)
    cut at every restart epoch in ``(0, max_epochs)``."""
    cuts = sorted({int(r) for r in restarts if 0 < int(r) < max_epochs})
    bounds = [0] + cuts + [max(1, int(max_epochs))]
    return list(zip(bounds[:-1], bounds[1:]))


def lr_factor(t: int, cycles: list[tuple[int, int]], floor: float = 0.01) -> float:
    """Multiplier of the base learning rate during 0-based epoch ``t``: within its cycle
    [a, b),  floor + (1 - floor) * (1 + cos(pi * (t - a + 1/2) / (b - a))) / 2,
    i.e. the cosine taken at the middle of the epoch, so that even a 3-epoch cycle ends with a
    small learning rate (0.93, 0.50, 0.07 of the base; one cycle of 30 epochs goes from
    1.00 to 0.01).  With
    restarts at ASHA's rung milestones every rung compares models whose learning rate has just
    been annealed, i.e. models as good as that many epochs can make them, instead of snapshots
    taken at a high learning rate; a trial that is promoted restarts warm from its weights."""
    for a, b in cycles:
        if a <= t < b:
            return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * (t - a + 0.5) / (b - a))) / 2.0
    return floor


class LocalSession:
    """Report sink outside Ray Tune: keeps every metrics dict and the last checkpoint state."""

    def __init__(self, resume_state: Optional[dict] = None) -> None:
        self.history: list[dict] = []
        self.last_state: Optional[dict] = None
        self._resume = resume_state

    def get_state(self) -> Optional[dict]:
        return self._resume

    def report(self, metrics: dict, state: Optional[dict]) -> None:
        self.history.append(dict(metrics))
        if state is not None:
            self.last_state = state


def write_torch_state(state: dict, directory: str) -> None:
    import torch

    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))


class TuneSession:
    """Reports to Ray Tune with a checkpoint directory written by ``write(state, dir)``
    (default: ``state.pt`` via ``torch.save``), read back on restore by ``read(dir)`` (default
    ``torch.load`` of ``state.pt``).  The only place matfusion talks to Tune."""

    def __init__(
        self, write: Callable[[dict, str], None] = write_torch_state, read: Optional[Callable[[str], dict]] = None
    ) -> None:
        self.write = write
        self.read = read

    def get_state(self) -> Optional[dict]:
        from ray import tune

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            if self.read is not None:
                return self.read(d)
            import torch

            return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)

    def report(self, metrics: dict, state: Optional[dict]) -> None:
        import ray
        from ray import tune

        # the Ray node that ran this epoch (Tune's own node_ip is the same for every node of a host)
        metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
        if state is None:  # an epoch without a checkpoint
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            self.write(state, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _to_cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def predict(
    model: nn.Module,
    data_list: list,
    y_mean: np.ndarray,
    y_std: np.ndarray,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    return_attention: bool = False,
):
    """Predictions in target units, shape (n, n_targets).  With ``return_attention``, also the
    per-sample fusion attention weights (n, 2) of an attention-fused model (else None)."""
    import torch
    from torch_geometric.loader import DataLoader

    device = device or next(model.parameters()).device
    model.eval()
    out, att = [], []
    with torch.no_grad():
        for batch in DataLoader(data_list, batch_size=batch_size, shuffle=False):
            out.append(model(batch.to(device)).cpu().numpy())
            a = getattr(model, "attention_weights", None)
            if a is not None:
                att.append(a.cpu().numpy())
    pred = np.concatenate(out, axis=0) if out else np.zeros((0, len(np.atleast_1d(y_mean))))
    pred = pred * y_std + y_mean
    if return_attention:
        return pred, (np.concatenate(att, axis=0) if att else None)
    return pred


def refresh_batch_norm(model: nn.Module, graphs: list, batch_size: int, device=None) -> bool:
    """Re-estimate every BatchNorm's running mean and variance with the model's current weights:
    reset them, then one forward pass in training mode (no gradients, cumulative average) over
    ``graphs``.  Returns False (and changes nothing) for a model without BatchNorm.

    Why: with PyTorch's default momentum (0.1) the running statistics trail the weights by
    about 20 optimizer steps, and a small training set has few steps per epoch, so for the first
    epochs evaluation would normalize with statistics of weights long gone; ASHA compares trials
    after a few epochs, so it needs the validation MAE of the weights themselves (measurements:
    docs/notes-trainables.md)."""
    import torch
    from torch import nn
    from torch_geometric.loader import DataLoader

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not graphs:
        return False
    device = device or next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the refresh batches
    was_training = model.training
    model.train()
    with torch.no_grad():
        for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False):
            model(batch.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return True


def target_stats(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-task mean and std over labelled (finite) values; std 1 where it would be 0."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    mean = np.array([np.nanmean(c) if np.isfinite(c).any() else 0.0 for c in y.T])
    std = np.array([np.nanstd(c) if np.isfinite(c).any() else 1.0 for c in y.T])
    std[~(std > 0)] = 1.0
    return mean, std


def validation_score(pred: np.ndarray, y: np.ndarray, y_std: np.ndarray) -> tuple[float, list[float]]:
    """(score, per-task MAE).  One task: its MAE in target units.  Several: the mean over tasks
    of MAE_k / std_k (train std), so tasks in different units count alike.  Missing labels
    (NaN) are ignored."""
    pred = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    y = np.asarray(y, dtype=np.float64).reshape(pred.shape)
    maes = []
    for k in range(pred.shape[1]):
        m = np.isfinite(y[:, k])
        maes.append(float(np.mean(np.abs(pred[m, k] - y[m, k]))) if m.any() else float("nan"))
    if len(maes) == 1:
        return maes[0], maes
    scaled = [mae / s for mae, s in zip(maes, np.atleast_1d(y_std)) if np.isfinite(mae)]
    return float(np.mean(scaled)), maes


def stacked_targets(graphs) -> np.ndarray:
    """(n, n_targets) float64: the ``y`` of every graph, stacked; read from the dataset's own ``y`` when it
    has one (a :class:`~matfusion.data.graph_store.LazyGraphDataset`: no graph is built), else from the items."""
    import torch

    y = getattr(graphs, "y", None)
    if y is None:
        y = torch.cat([d.y for d in graphs])
    return y.numpy().astype(np.float64)


def train_torch_model(
    model: nn.Module,
    train_list: list,
    val_list: list,
    settings: LoopSettings,
    session=None,
    extra_metrics: Optional[dict] = None,
    criterion: Optional[nn.Module] = None,
    val_hook: Optional[Callable] = None,
    target_names: Optional[list[str]] = None,
    extra_state: Optional[dict] = None,
    score_std: Optional[np.ndarray] = None,
) -> dict:
    """Train ``model`` on ``train_list`` (PyG Data with ``y`` of shape (1, n_targets), NaN =
    missing label: a list, or a dataset such as :class:`~matfusion.data.graph_store.LazyGraphDataset`
    that builds each graph when a batch reads it), select on ``val_list``.

    ``criterion`` (default: :class:`MultiTaskLoss` with equal weights) gets standardized
    predictions and targets; its parameters (learned task uncertainties) are trained too.
    ``val_hook(val_pred) -> (val_pred, metrics, state)`` may transform the validation
    predictions (late fusion) before scoring.  ``score_std`` (default: the training targets'
    std) scales the per-task MAEs of a multi-task validation score (residual fusion trains on
    residuals but is scored on the real targets, with their std).  Returns the final checkpoint state
    (``best_model`` weights, ``best_val_mae``, ``y_mean``, ``y_std``, ...).
    """
    import torch
    from torch import nn
    from torch_geometric.loader import DataLoader

    from .multitask import MultiTaskLoss

    session = session or LocalSession()
    device = pick_device(settings.device)
    model.to(device)
    y_train = stacked_targets(train_list)
    y_mean, y_std = target_stats(y_train)
    y_val = stacked_targets(val_list)
    score_std = y_std if score_std is None else np.asarray(score_std, dtype=np.float64)
    n_tasks = y_train.shape[1]
    names = list(target_names) if target_names else [f"t{k}" for k in range(n_tasks)]
    criterion = (criterion or MultiTaskLoss(n_tasks, base=settings.loss)).to(device)

    params = list(model.parameters()) + list(criterion.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    cycles = lr_cycles(settings.max_epochs, settings.lr_restarts)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, cycles))
    gen = torch.Generator().manual_seed(settings.seed)
    mean_t = torch.tensor(y_mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(y_std, dtype=torch.float32, device=device)

    start_epoch, best_val, best_epoch, best_weights, best_hook_state = 1, float("inf"), 0, None, {}
    resume = session.get_state()
    if resume is not None:
        model.load_state_dict(resume["model"])
        criterion.load_state_dict(resume["criterion"])
        # a copy: Optimizer.load_state_dict keeps the given tensors, so training would otherwise
        # mutate the caller's checkpoint state (a second resume from it would then differ)
        opt.load_state_dict(copy.deepcopy(resume["optimizer"]))
        sched.load_state_dict(resume["scheduler"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        start_epoch = resume["epoch"] + 1
        best_val, best_epoch, best_weights = resume["best_val_mae"], resume["best_epoch"], resume["best_model"]
        best_hook_state = resume.get("best_hook_state", {})

    loader = DataLoader(train_list, batch_size=settings.batch_size, shuffle=True, generator=gen, drop_last=False)
    n_refresh = min(len(train_list), max(0, int(settings.bn_refresh_graphs)))
    refresh_list = [
        train_list[i]
        for i in np.sort(np.random.default_rng([settings.seed, 2027]).permutation(len(train_list))[:n_refresh])
    ]
    state = resume
    for epoch in range(start_epoch, settings.max_epochs + 1):
        model.train()
        epoch_lr = opt.param_groups[0]["lr"]  # the learning rate of this epoch (reported below)
        total, count = 0.0, 0
        for batch in loader:
            batch = batch.to(device)
            opt.zero_grad()
            pred = model(batch)
            target = (batch.y.view(pred.shape) - mean_t) / std_t
            loss = criterion(pred, target)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"training loss became {loss.item()} at epoch {epoch} (lr={settings.lr}); "
                    "the trial is stopped: lower the learning rate or check the targets for extreme values"
                )
            loss.backward()
            nn.utils.clip_grad_norm_(params, settings.clip_norm)
            opt.step()
            total += loss.item() * batch.num_graphs
            count += batch.num_graphs
        sched.step()
        train_loss = total / max(count, 1)

        refresh_batch_norm(model, refresh_list, settings.batch_size, device)
        val_pred, attention = predict(model, val_list, y_mean, y_std, device=device, return_attention=True)
        epoch_metrics: dict = {}
        hook_state: dict = {}
        if val_hook is not None:
            val_pred, epoch_metrics, hook_state = val_hook(val_pred)
        val_mae, task_maes = validation_score(val_pred, y_val, score_std)
        if not np.isfinite(val_mae):
            raise NonFiniteLossError(f"validation MAE became {val_mae} at epoch {epoch} (lr={settings.lr})")
        if val_mae < best_val:
            best_val, best_epoch, best_weights = val_mae, epoch, _to_cpu(model.state_dict())
            best_hook_state = dict(hook_state)
        finished = epoch >= settings.max_epochs or epoch - best_epoch >= settings.patience
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_mae": val_mae,
            "best_val_mae": best_val,
            "lr": epoch_lr,
            "trial_finished": bool(finished),
            **epoch_metrics,
            **(extra_metrics or {}),
        }
        if n_tasks > 1:
            weights = criterion.effective_weights().cpu().numpy()
            for k, name in enumerate(names):
                metrics[f"val_mae_{name}"] = task_maes[k]
                metrics[f"task_weight_{name}"] = float(weights[k])
        if attention is not None:
            metrics["attention_graph"] = float(attention[:, 0].mean())
        if not (finished or epoch % max(1, settings.checkpoint_every) == 0 or epoch in settings.checkpoint_at):
            session.report(metrics, None)
            continue
        state = {
            "model": _to_cpu(model.state_dict()),
            "optimizer": copy.deepcopy(opt.state_dict()),
            "scheduler": sched.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": epoch,
            "best_val_mae": best_val,
            "best_epoch": best_epoch,
            "best_model": best_weights,
            "best_hook_state": best_hook_state,
            "criterion": _to_cpu(criterion.state_dict()),
            "y_mean": y_mean,
            "y_std": y_std,
            "target_names": names,
            **(extra_state or {}),
        }
        session.report(metrics, state)
        if finished:
            break
    if best_weights is not None:
        model.load_state_dict(best_weights)
    return state
