"""The typed config of one trial, parsed once at the top of the trial.

A trial config travels through Ray Tune and MLflow as the nested dict the search space
produces (Optuna's define-by-run output, un-flattened by Ray), e.g.::

    {"family": "cgcnn",
     "cgcnn": {"hidden": 64, "n_conv": 3, "lr": 3e-3, "batch_size": 64, "fusion": "early",
               "comp_hidden": 128, "comp_layers": 2},
     "multitask": {"weighting": "fixed", "w_K_VRH": 1.0, "w_G_VRH": 0.5},
     "max_epochs": 30, "seed": 0, "patience": 20, "cpus": 1, "targets": ["K_VRH", "G_VRH"],
     "checkpoint_every": 1, "lr_restarts": [], "checkpoint_at": [3, 9]}

:meth:`TrialConfig.parse` turns it into typed fields (``trial.params`` is the family's
:class:`~matfusion.families.base.HyperParams`, with the family's defaults for what the dict
leaves out); :meth:`TrialConfig.to_dict` gives the dict back.  A graph trial may also carry an
``rf`` section: the parameters of its late-fusion forests.  Unknown keys are errors naming them.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from ..trainables.loop import LoopSettings
from .base import HyperParams

TASK_WEIGHTINGS = ("fixed", "tuned", "uncertainty")
DEFAULT_TASK_WEIGHT = 1.0  # lambda of a target without a fixed or searched weight
LATE_FOREST_FAMILY = "rf"  # the family whose section parametrizes late fusion's forests
_TOP_LEVEL = (
    "family",
    "multitask",
    "max_epochs",
    "seed",
    "patience",
    "cpus",
    "targets",
    "checkpoint_every",
    "lr_restarts",
    "checkpoint_at",
)


class TrialConfigError(ValueError):
    """A trial config that cannot be used; the message names the offending keys."""


class Multitask(BaseModel):
    """Loss weighting over several targets (graph families; a tabular family fits one model per
    target).  ``fixed`` and ``tuned``: lambda_k from ``w_<target>`` (default 1); ``uncertainty``:
    learned homoscedastic weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    weighting: Literal[TASK_WEIGHTINGS] = "fixed"
    weights: dict[str, float] = Field(default_factory=dict, description="target -> lambda (the w_<target> keys)")

    @classmethod
    def from_section(cls, section: Optional[Mapping]) -> "Multitask":
        section = dict(section or {})
        weights = {k[2:]: section.pop(k) for k in list(section) if k.startswith("w_")}
        if weights:
            section["weights"] = weights
        return cls.model_validate(section)

    def weight(self, target: str) -> float:
        return float(self.weights.get(target, DEFAULT_TASK_WEIGHT))

    def to_dict(self) -> dict:
        out = {"weighting": self.weighting} if "weighting" in self.model_fields_set else {}
        out.update({f"w_{k}": v for k, v in self.weights.items()})
        return out


class TrialConfig(BaseModel):
    """One trial: the family, its typed hyperparameters and the loop's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: str
    params: SerializeAsAny[HyperParams]
    forest: Optional[SerializeAsAny[HyperParams]] = Field(
        None, description="a graph trial's rf section: its late-fusion forests (default: the rf family's defaults)"
    )
    max_epochs: int = Field(LoopSettings.max_epochs, ge=1)
    seed: int = LoopSettings.seed
    patience: int = Field(LoopSettings.patience, ge=1)
    cpus: float = Field(1.0, gt=0.0, description="threads of the trial: max(1, int(cpus))")
    targets: Optional[list[str]] = None
    checkpoint_every: int = Field(LoopSettings.checkpoint_every, ge=1)
    lr_restarts: tuple[int, ...] = LoopSettings.lr_restarts
    checkpoint_at: tuple[int, ...] = LoopSettings.checkpoint_at
    multitask: Multitask = Field(default_factory=Multitask)

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))

    @property
    def late_forest(self) -> HyperParams:
        """The parameters of late fusion's forests: the trial's rf section, else rf's defaults."""
        from . import get

        return self.forest if self.forest is not None else get(LATE_FOREST_FAMILY).parse({})

    @classmethod
    def parse(cls, config: Union["TrialConfig", Mapping[str, Any]]) -> "TrialConfig":
        """The typed trial config of a trial dict (a TrialConfig is returned as it is)."""
        if isinstance(config, TrialConfig):
            return config
        from . import get, names

        if not isinstance(config, Mapping) or "family" not in config:
            raise TrialConfigError(f"a trial config is a mapping with a 'family' key; got {config!r}")
        raw = dict(config)
        name = str(raw.pop("family"))
        family = get(name)
        errors: list[str] = []
        fields: dict = {"family": name}
        sections = {name: raw.pop(name, None)}
        if family.graph and LATE_FOREST_FAMILY in raw:
            sections[LATE_FOREST_FAMILY] = raw.pop(LATE_FOREST_FAMILY)
        for section_name, section in sections.items():
            if section is not None and not isinstance(section, (Mapping, HyperParams)):
                errors.append(f"{section_name}: expected a mapping of hyperparameters, got {section!r}")
                continue
            try:
                parsed = get(section_name).parse(section)
            except ValidationError as err:
                errors += _messages(err, section_name)
                continue
            fields["params" if section_name == name else "forest"] = parsed
        for key in list(raw):
            if key in names():
                errors.append(f"{key}: a section of another family in a {name} trial")
            elif key not in _TOP_LEVEL:
                errors.append(f"{key}: unknown key")
            else:
                continue
            raw.pop(key)
        if "multitask" in raw:
            try:
                fields["multitask"] = Multitask.from_section(raw.pop("multitask"))
            except ValidationError as err:
                errors += _messages(err, "multitask")
        if not errors:
            try:
                trial = cls.model_validate({**raw, **fields})
            except ValidationError as err:
                errors += _messages(err, "")
            else:
                return trial
        raise TrialConfigError(
            f"invalid {name} trial config:\n  "
            + "\n  ".join(errors)
            + f"\n(top-level keys: {', '.join(_TOP_LEVEL)}, and the {name} section)"
        )

    def to_dict(self) -> dict:
        """The nested trial dict (what the search space emits; defaults the dict left out stay out)."""
        out: dict = {"family": self.family, self.family: self.params.model_dump(exclude_unset=True)}
        if self.forest is not None:
            out[LATE_FOREST_FAMILY] = self.forest.model_dump(exclude_unset=True)
        for key in _TOP_LEVEL[2:]:
            if key in self.model_fields_set:
                value = getattr(self, key)
                out[key] = list(value) if isinstance(value, tuple) else value
        if "multitask" in self.model_fields_set:
            out["multitask"] = self.multitask.to_dict()
        return out


def _messages(err: ValidationError, prefix: str) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<root>")
        if e["type"] == "extra_forbidden":
            out.append(f"{key}: unknown key")
        else:
            out.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return out
