"""The one home of the fusions of a graph encoder with the descriptor (Magpie) branch: their
names, their typed parameters and defaults, their search space and the model wrapper.

- ``none``: the encoder alone;
- ``early`` / ``attention``: the encoder fused with the descriptor MLP branch
  (:class:`~matfusion.trainables.fusion.FusedModel`), with ``comp_hidden`` / ``comp_layers``
  (and ``fusion_dim`` for attention);
- ``late``: alpha * RF + (1 - alpha) * GNN on finished predictions, alpha chosen on the inner
  validation rows (the trainable does it; the forests use the trial's ``rf`` section, else the
  rf family's defaults);
- ``residual`` (delta learning): y = t(x) + beta * GNN(x).  t is a tabular model on the
  descriptor matrix (``residual_base``: any tabular family of the registry, fitted by its
  ``fit_matrix``: LightGBM with the lgbm family's defaults, its ``n_estimators`` rounds, no early
  stopping; rf with the trial's ``rf`` section, else rf's defaults; et with et's defaults); the
  encoder alone learns the standardized residual y - t(x).  On the trial's training rows t(x) is
  out of fold (``residual_folds`` seeded folds of the training rows, each fold predicted by a t
  fitted on the other folds); on every other row (validation, test, predict) it is one t fitted
  on all the training rows.  No validation or test row reaches a t fit (the trainable does it:
  :func:`matfusion.trainables.trial.fit_residual_base`).  ``residual_blend`` (default on): beta
  in [0, 1] per target, re-chosen at every epoch on the inner validation rows (the rows early
  stopping selects on; never a test row) as the one minimizing their MAE, so that a member whose
  GNN does not help falls back to t (:func:`matfusion.trainables.trial.choose_residual_beta`);
  off: beta = 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..spaces.params import Categorical, Int
from .base import HyperParams, defaults_of

FUSIONS = ("none", "early", "attention", "late", "residual")
# the fusion a graph family's seeded default point takes, first allowed of these
PREFERRED = ("early", "attention", "none", "late", "residual")
# fusion -> the fusion parameters it searches
USES = {
    "none": (),
    "late": (),
    "early": ("comp_hidden", "comp_layers"),
    "attention": ("comp_hidden", "comp_layers", "fusion_dim"),
    "residual": ("residual_base",),
}
# the fusions whose model is the encoder alone (late and residual add a tabular model outside it)
ENCODER_ONLY = ("none", "late", "residual")
# the fusions whose prediction reads the descriptor matrix (all but none)
DESCRIPTOR_FUSIONS = ("early", "attention", "late", "residual")
# the tabular families residual_base is searched over (lgbm, the default, first); a trial config may
# name any registered tabular family (see residual_bases)
RESIDUAL_BASES = ("lgbm", "rf", "et")


def residual_bases() -> tuple[str, ...]:
    """The families that may serve as residual fusion's t: every registered tabular family."""
    from . import TABULAR

    return TABULAR


class FusionParams(HyperParams):
    """The fusion fields of a graph family's hyperparameters."""

    fusion: Literal[FUSIONS] = "none"
    comp_hidden: int = Field(128, ge=1, description="width of the descriptor MLP branch")
    comp_layers: int = Field(2, ge=1, description="layers of the descriptor MLP branch")
    fusion_dim: int = Field(128, ge=1, description="attention: width both modalities are projected to")
    residual_base: str = Field(
        "lgbm", description="residual: the tabular family of the model t whose residual y - t(x) the GNN learns"
    )
    residual_folds: int = Field(
        5, ge=2, description="residual: folds of the training rows for t's out-of-fold predictions"
    )
    residual_blend: bool = Field(
        True, description="residual: predict t + beta * GNN, beta in [0, 1] chosen on the inner validation rows"
    )

    @field_validator("residual_base")
    @classmethod
    def _tabular_base(cls, name: str) -> str:
        known = residual_bases()
        if name not in known:
            raise ValueError(
                f"{name!r} is not a tabular family (t is fitted on descriptors); one of {', '.join(known)}"
            )
        return name


PARAMS = {
    "comp_hidden": Categorical((64, 128, 256)),
    "comp_layers": Int(1, 3),
    "fusion_dim": Categorical((64, 128)),
    "residual_base": Categorical(RESIDUAL_BASES),
}
PRESETS = {"quick": {"comp_hidden": Categorical((64, 128)), "comp_layers": Int(1, 2)}}
DEFAULTS = defaults_of(FusionParams, PARAMS)
# fusion parameters searched only when ``search.space`` names them (a list or a range narrower
# than this one searches, a scalar fixes); otherwise the trial takes the typed default
OPT_IN = {"residual_folds": Int(2, 10), "residual_blend": Categorical((True, False))}
OPT_IN_USES = {"residual": ("residual_folds", "residual_blend")}


def fusion_space(s, fusion: str) -> None:
    """``s`` suggests under the GNN family's prefix; ``fusion`` has already been chosen."""
    for param in USES[fusion]:
        s(param)
    for param in OPT_IN_USES.get(fusion, ()):
        if s.specs.get(param, OPT_IN[param]) != OPT_IN[param]:  # named by search.space
            s(param)


def default_fusion(choices) -> str:
    preferred = [f for f in PREFERRED if f in choices]
    return preferred[0] if preferred else choices[0]


def fuse(
    encoder,
    params: FusionParams,
    graph_dim: int,
    descriptor_features: int,
    head_hidden: int,
    dropout: float,
    n_targets: int,
):
    """The encoder fused with the descriptor branch as ``params.fusion`` asks (``none``, ``late``
    and ``residual``: the encoder itself)."""
    if params.fusion in ENCODER_ONLY:
        return encoder
    from ..trainables.fusion import FusedModel

    return FusedModel(
        encoder,
        graph_dim=graph_dim,
        fusion=params.fusion,
        descriptor_dim=descriptor_features,
        comp_hidden=params.comp_hidden,
        comp_layers=params.comp_layers,
        fusion_dim=params.fusion_dim,
        head_hidden=head_hidden,
        dropout=dropout,
        n_targets=n_targets,
    )
