"""Package a fitted ensemble as an MLflow pyfunc model, register it, export it, predict with it.

The pyfunc model (:class:`EnsemblePyfunc`) takes a DataFrame with a ``structure`` column (a
pymatgen ``Structure`` dict, its JSON text, CIF text or POSCAR text) and returns a DataFrame
with ``prediction``, ``std`` (calibrated: about 68 % of out-of-fold errors within it), ``lower``
and ``upper`` (the conformal interval at the model's coverage, default 90 %; the pyfunc param
``coverage`` asks for another) and ``spread`` (the uncalibrated spread of the K fold-model
stacks); k targets: ``prediction_<target>``, ``std_<target>`` ... for each target, see
:func:`output_columns`.  A model saved before the intervals existed gives ``prediction`` and
``std`` (its spread) as it always did.  It featurizes its input itself, with the featurizer
parameters the ensemble was trained with (stored in ``featurizer.json``): the descriptor matrix of
the same descriptor sets (``descriptors``: Magpie and the structural sets, see
:mod:`matfusion.data.descriptors`) and, when a member is a graph model, the
crystal graph (:func:`~matfusion.data.crystal_graph.neighbor_graph`, same cutoff and
max_neighbors; plus the line graph when an ALIGNN member exists).  A structure that cannot be
parsed gets NaN prediction and std (and a warning naming its row) instead of failing the batch.

Artifacts of the model: ``ensemble.pkl`` (the fitted :class:`StackedEnsemble`: fold models'
weights and forests, meta-learner), ``featurizer.json`` and ``card.json`` (task, fold, members,
weights, metrics, seed, package versions; :func:`export_model` turns it into README.md).

Environment: the model records what serving it needs (docs/serving.md).  ``requirements.txt``
(and conda.yaml / python_env.yaml): the installed versions of :data:`SERVING_PACKAGES`, the
libraries the model imports to featurize and predict, pinned exactly (a local build label such
as ``+cpu`` dropped, so that PyPI or the PyTorch CPU index can resolve it); matfusion itself is
not a requirement (it is not published on a package index) but ships with the model as its
``code`` (``code_paths``: a copy of the ``matfusion`` package that trained it, which MLflow puts
first on ``sys.path`` when it loads the model).  ``mlflow models serve --env-manager local`` thus
works in any environment with the requirements installed, matfusion installed or not; the
MLmodel's ``metadata`` says which matfusion version the code is.

Registry: :func:`register_ensemble` registers a model as ``matfusion-<task>`` with version tags
``task``, ``fold``, ``test_mae``; alias ``champion`` moves to the new version only when its
test MAE is lower than the current champion's *on the same task and fold* (a champion on
another fold is not comparable: it keeps the alias).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel as _PythonModel

log = logging.getLogger("matfusion.ensembles")

MODEL_NAME = "model"  # artifact name of the pyfunc model inside the ensemble run
CHAMPION = "champion"
_PACKAGES = (
    "matfusion",
    "torch",
    "torch_geometric",
    "scikit-learn",
    "scipy",
    "numpy",
    "pandas",
    "pymatgen",
    "matminer",
    "mlflow",
    "lightgbm",
)
# what a fresh environment needs to load and serve the model: the libraries of featurization
# (pymatgen, matminer), of the member families (scikit-learn, lightgbm, torch, torch-geometric),
# of matfusion's configs (pydantic, pyyaml) and MLflow's; not the search (ray, optuna)
SERVING_PACKAGES = (
    "mlflow",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "lightgbm",
    "torch",
    "torch-geometric",
    "pymatgen",
    "matminer",
    "pydantic",
    "pyyaml",
    "tqdm",
    "matplotlib",
)


def registered_name(task: str) -> str:
    return f"matfusion-{task}"


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


# -- featurization of raw structures ------------------------------------------------------------


def parse_structure(value):
    """A pymatgen Structure from a Structure, dict, JSON text, CIF or POSCAR text."""
    from ..data.tables import parse_structure as _parse_structure

    return _parse_structure(value)


def featurize_structures(structures: Sequence, featurizer: dict):
    """(descriptor matrix (n, d), GraphSet or None) of parsed structures, with the training
    parameters: the descriptor sets named in ``featurizer["descriptors"]`` (Magpie only for
    models saved before descriptor sets existed)."""
    from ..data.crystal_graph import GraphSet
    from ..data.descriptors import descriptor_matrix
    from ..data.featurize import graph_parts

    X = descriptor_matrix(list(structures), featurizer.get("descriptors") or ["magpie"])
    if not featurizer.get("graphs"):
        return X, None
    cutoff, max_nb = float(featurizer["cutoff"]), int(featurizer["max_neighbors"])
    with_line_graph = bool(featurizer.get("line_graph"))
    parts = [graph_parts(s, cutoff, max_nb, with_line_graph) for s in structures]
    return X, GraphSet.from_parts(parts, cutoff, max_nb)


def featurizer_spec(
    ensemble, cutoff: float, max_neighbors: int, line_graph: bool = False, descriptors: Optional[Sequence[str]] = None
) -> dict:
    """What the pyfunc model needs to featurize like training did.  ``descriptors``: the
    descriptor sets of the training matrix (``FeatureSet.descriptor_sets``); if not given they are
    inferred from the width of the matrix the ensemble was fitted on (magpie, or the default
    set for structures)."""
    from ..data.descriptors import columns_of, infer_sets, width_of

    if descriptors is None:
        width = getattr(ensemble, "n_features_", None)
        descriptors = infer_sets(width) if width else ["magpie"]
    descriptors = list(descriptors)
    width = getattr(ensemble, "n_features_", None)
    if width and width_of(descriptors) != width:
        raise ValueError(
            f"descriptor sets {descriptors} make {width_of(descriptors)} columns; the ensemble was fitted on {width}"
        )
    return {
        "magpie": "matminer ElementProperty magpie preset (132)",
        "descriptors": descriptors,
        "descriptor_columns": len(columns_of(descriptors)),
        "graphs": bool(ensemble.needs_graphs),
        "cutoff": float(cutoff),
        "max_neighbors": int(max_neighbors),
        "line_graph": bool(line_graph or ensemble.needs_line_graph),
        "graph_params": ensemble.graph_params_,
    }


def output_kinds(ensemble) -> list[str]:
    """``[prediction, std, lower, upper, spread]`` for a calibrated ensemble, ``[prediction, std]``
    for one fitted before the conformal intervals existed."""
    calibrated = bool(getattr(ensemble, "calibrators_", None))
    return ["prediction", "std", "lower", "upper", "spread"] if calibrated else ["prediction", "std"]


def output_columns(ensemble) -> list[str]:
    """:func:`output_kinds`, or ``[prediction_<t>, std_<t>, ...]`` for a multi-target ensemble."""
    kinds = output_kinds(ensemble)
    if not getattr(ensemble, "multi_target", False):
        return kinds
    return [f"{c}_{t}" for t in ensemble.target_names_ for c in kinds]


def predict_parsed(ensemble, featurizer: dict, structures: Sequence, coverage: Optional[float] = None) -> dict:
    """``{kind: values}`` for each of :func:`output_kinds` (``prediction`` is the mean): (n,)
    each, or (n, k) for a multi-target ensemble; ``lower`` / ``upper`` at ``coverage`` (default
    the model's)."""
    kinds = output_kinds(ensemble)
    if not len(structures):
        k = getattr(ensemble, "n_targets_", 1)
        return {c: np.zeros(0) if k == 1 else np.zeros((0, k)) for c in kinds}
    X, graphs = featurize_structures(structures, featurizer)
    rows = np.arange(len(structures))
    if "lower" not in kinds:
        mean, std = ensemble.predict(X, graphs, rows, return_std=True)
        return {"prediction": mean, "std": std}
    out = ensemble.predict_interval(X, graphs, rows, coverage=coverage)
    return {"prediction": out["mean"], **{c: out[c] for c in kinds[1:]}}


# -- the pyfunc model -----------------------------------------------------------------------------


MANIFEST = "manifest"  # artifact: the SHA-256 of every other artifact, checked before anything is unpickled


class ManifestMismatchError(ValueError):
    """An artifact of an exported model differs from what its manifest recorded at export."""


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(paths: dict, path: str) -> str:
    """``{name: {"file": basename, "sha256": ...}}`` of the artifacts ``paths`` (name -> file), as JSON at ``path``."""
    manifest = {name: {"file": os.path.basename(p), "sha256": _sha256(p)} for name, p in paths.items()}
    with open(path, "w") as fh:
        json.dump({"sha256": manifest}, fh, indent=2)
    return path


def verify_manifest(artifacts: dict) -> None:
    """Check every artifact the manifest lists against its recorded SHA-256; raise
    :class:`ManifestMismatchError` naming the first that differs or is missing.  A model saved
    before manifests existed (no ``manifest`` artifact) loads with a warning."""
    if MANIFEST not in artifacts:
        log.warning("this model has no artifact manifest (saved before matfusion 0.2?): its files are not checked")
        return
    with open(artifacts[MANIFEST]) as fh:
        recorded = json.load(fh)["sha256"]
    for name, entry in recorded.items():
        path = artifacts.get(name)
        if path is None or not os.path.isfile(path):
            raise ManifestMismatchError(f"model artifact {entry['file']!r} is missing (listed in the model's manifest)")
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise ManifestMismatchError(
                f"model artifact {entry['file']!r} changed since export (sha256 {digest[:12]}..., manifest "
                f"{entry['sha256'][:12]}...): refusing to load it; export the model again from its run"
            )


class EnsemblePyfunc(_PythonModel):
    """MLflow pyfunc wrapper of a :class:`~matfusion.ensembles.stacking.StackedEnsemble`."""

    def load_context(self, context) -> None:
        verify_manifest(context.artifacts)  # before ensemble.pkl is unpickled
        with open(context.artifacts["ensemble"], "rb") as fh:
            self.ensemble = pickle.load(fh)
        with open(context.artifacts["featurizer"]) as fh:
            self.featurizer = json.load(fh)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame) or "structure" not in model_input.columns:
            raise ValueError(
                "input must be a DataFrame with a 'structure' column (pymatgen dict, JSON, CIF or POSCAR text)"
            )
        values = model_input["structure"].tolist()
        ok, structures = [], []
        for i, v in enumerate(values):
            try:
                structures.append(parse_structure(v))
                ok.append(i)
            except Exception as err:  # noqa: BLE001 - pymatgen raises many types
                warnings.warn(
                    f"row {i}: cannot parse structure ({type(err).__name__}: {err}); prediction is NaN", stacklevel=2
                )
        k = getattr(self.ensemble, "n_targets_", 1)
        coverage = (params or {}).get("coverage")
        kinds = output_kinds(self.ensemble)
        values_of = {c: np.full((len(values), k), np.nan) for c in kinds}
        if ok:
            got = predict_parsed(self.ensemble, self.featurizer, structures, coverage=coverage)
            for c in kinds:
                values_of[c][ok] = np.reshape(got[c], (len(ok), k))
        if k == 1:
            return pd.DataFrame({c: values_of[c][:, 0] for c in kinds}, index=model_input.index)
        cols = {}
        for t, name in enumerate(self.ensemble.target_names_):
            for c in kinds:
                cols[f"{c}_{name}"] = values_of[c][:, t]
        return pd.DataFrame(cols, index=model_input.index)


def _signature_and_example(
    example_structures: Sequence, columns: Sequence[str] = ("prediction", "std"), coverage: Optional[float] = None
):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    params = None if coverage is None else ParamSchema([ParamSpec("coverage", "double", float(coverage))])
    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "structure")]),
        outputs=Schema([ColSpec("double", c) for c in columns]),
        params=params,
    )
    example = pd.DataFrame({"structure": [json.dumps(s.as_dict()) for s in example_structures]})
    return signature, example


def _pip_requirements() -> list[str]:
    """``name==version`` of each installed :data:`SERVING_PACKAGES` (a local label such as
    ``+cpu`` dropped: ``torch==2.13.0`` matches the CPU build and the PyPI one)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in SERVING_PACKAGES:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return out


def _code_paths() -> list[str]:
    """The ``matfusion`` package folder this process imported (copied into the model's ``code``)."""
    import matfusion

    return [str(Path(matfusion.__file__).resolve().parent)]


def _environment() -> dict:
    """What the model records of its environment (keyword arguments of log_model / save_model)."""
    import matfusion

    return {
        "pip_requirements": _pip_requirements(),
        "code_paths": _code_paths(),
        "metadata": {"matfusion_version": matfusion.__version__, "serving": "docs/serving.md"},
    }


def _write_artifacts(ensemble, featurizer: dict, card: dict, directory: str) -> dict:
    paths = {
        "ensemble": os.path.join(directory, "ensemble.pkl"),
        "featurizer": os.path.join(directory, "featurizer.json"),
        "card": os.path.join(directory, "card.json"),
    }
    with open(paths["ensemble"], "wb") as fh:
        pickle.dump(ensemble, fh)
    with open(paths["featurizer"], "w") as fh:
        json.dump(featurizer, fh, indent=2)
    with open(paths["card"], "w") as fh:
        json.dump(card, fh, indent=2, default=str)
    paths[MANIFEST] = write_manifest(paths, os.path.join(directory, "manifest.json"))
    return paths


def make_card(
    ensemble,
    task: str,
    fold: int,
    metrics: dict,
    data: Optional[dict] = None,
    extra: Optional[dict] = None,
    reliability: Optional[dict] = None,
) -> dict:
    """The model card's content (written as card.json, rendered into README.md on export).
    ``reliability``: ``Evaluation.reliability`` (target -> (nominal levels, observed test
    coverage)), drawn as reliability.png on export."""
    card = {
        "task": task,
        "fold": int(fold),
        "data": data or {},
        "ensemble": ensemble.summary(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "versions": package_versions(),
        **(extra or {}),
    }
    if reliability:
        card["reliability"] = {
            str(t): {"nominal": [float(x) for x in lv], "observed": [float(x) for x in ob]}
            for t, (lv, ob) in reliability.items()
        }
    return card


def log_ensemble_model(
    run_id: str,
    ensemble,
    featurizer: dict,
    card: dict,
    example_structures: Sequence,
    tracking_uri: Optional[str] = None,
):
    """Log the pyfunc model into run ``run_id`` (under ``model``); returns its ModelInfo."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    signature, example = _signature_and_example(
        list(example_structures)[:2], output_columns(ensemble), getattr(ensemble, "coverage_", None)
    )
    with tempfile.TemporaryDirectory() as d, mlflow.start_run(run_id=run_id):
        artifacts = _write_artifacts(ensemble, featurizer, card, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=EnsemblePyfunc(),
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                **_environment(),
            )


def save_ensemble_model(path: str, ensemble, featurizer: dict, card: dict, example_structures: Sequence) -> str:
    """Save the pyfunc model to a local directory (no tracking server needed)."""
    import mlflow

    signature, example = _signature_and_example(
        list(example_structures)[:2], output_columns(ensemble), getattr(ensemble, "coverage_", None)
    )
    with tempfile.TemporaryDirectory() as d:
        artifacts = _write_artifacts(ensemble, featurizer, card, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(
                path,
                python_model=EnsemblePyfunc(),
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                **_environment(),
            )
    return path


def _float_tag(version, key: str) -> float:
    try:
        return float(version.tags.get(key))
    except (TypeError, ValueError):
        return math.nan


def register_ensemble(tracking_uri: str, model_uri: str, task: str, fold: int, test_mae: float) -> tuple[object, bool]:
    """Register ``model_uri`` as a new version of ``matfusion-<task>`` (version tags task,
    fold, test_mae) and move alias ``champion`` to it if its test MAE is lower than the
    champion's on the same task and fold, or if there is no champion.  A champion of another
    fold is not comparable and keeps the alias.  Returns (ModelVersion, moved)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    name = registered_name(task)
    mv = mlflow.register_model(
        model_uri, name, tags={"task": task, "fold": str(int(fold)), "test_mae": repr(float(test_mae))}
    )
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    moved = False
    if champ is None:
        moved = True
    elif champ.tags.get("task") == task and champ.tags.get("fold") == str(int(fold)):
        old = _float_tag(champ, "test_mae")
        moved = not math.isfinite(old) or float(test_mae) < old
    else:
        log.warning(
            "%s@%s is on task %s fold %s, not comparable with fold %s: alias kept",
            name,
            CHAMPION,
            champ.tags.get("task"),
            champ.tags.get("fold"),
            fold,
        )
    if moved:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return mv, moved


# -- export --------------------------------------------------------------------------------------


class ModelNotFoundError(LookupError):
    """A model URI, run id or folder that names no loadable model (one line: which and what to do)."""


def resolve_model_uri(ref: str) -> str:
    """A model URI from a URI (``models:/``, ``runs:/``, a path) or a bare run id."""
    if "://" in ref or ref.startswith(("models:/", "runs:/")) or os.path.exists(ref):
        return ref
    if len(ref) == 32 and all(c in "0123456789abcdef" for c in ref.lower()):
        return f"runs:/{ref}/{MODEL_NAME}"
    raise ModelNotFoundError(
        f"no model at {ref!r}: it is neither an existing folder, nor a model URI (models:/NAME@ALIAS, "
        "runs:/ID/model), nor a run id (32 hex digits); check the path or the URI"
    )


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_card(card: dict, model_uri: str) -> str:
    ens = card.get("ensemble", {})
    lines = [f"# matfusion stacked ensemble: {card.get('task')}", "", f"Source: `{model_uri}`", "", "## Data", ""]
    for k, v in (card.get("data") or {}).items():
        lines.append(f"- {k}: {v}")
    lines += [
        f"- outer fold: {card.get('fold')} (the ensemble was fitted on its training rows only; "
        "metrics are on its untouched test rows)",
        f"- meta-learner trained on {ens.get('n_meta_rows')} out-of-fold predictions "
        f"({ens.get('n_folds')}-fold, seed {ens.get('seed')})",
        "",
        "## Members and weights",
        "",
        f"Meta-learner: `{ens.get('meta')}`",
        "",
        "| member | weight |",
        "|---|---|",
    ]
    weights = ens.get("weights") or {}
    targets = list(ens.get("targets") or [])
    if len(targets) > 1:  # one meta-learner per target
        lines[-2:] = [
            "| member | " + " | ".join(f"weight {t}" for t in targets) + " |",
            "|---|" + "---|" * len(targets),
        ]
        per = [weights.get(t) or {} for t in targets]
        for name in ens.get("members", []) + ["intercept"]:
            if name == "intercept" and not any("intercept" in w for w in per):
                continue
            label = "(intercept)" if name == "intercept" else name
            lines.append(f"| {label} | " + " | ".join(_fmt(w.get(name, "n/a")) for w in per) + " |")
    else:
        for name in ens.get("members", []):
            lines.append(f"| {name} | {_fmt(weights.get(name, 'n/a'))} |")
        if "intercept" in weights:
            lines.append(f"| (intercept) | {_fmt(weights['intercept'])} |")
    lines += [
        "",
        "Member configs:",
        "",
        "```json",
        json.dumps(ens.get("member_configs"), indent=1),
        "```",
        "",
        "## Test metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in sorted((card.get("metrics") or {}).items()):
        lines.append(f"| {k} | {_fmt(v)} |")
    lines += _uncertainty_lines(card)
    calibrated = bool(ens.get("calibration"))
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import mlflow, pandas as pd",
        "model = mlflow.pyfunc.load_model('.')  # this directory",
        "model.predict(pd.DataFrame({'structure': [structure.as_dict()]}))  # -> "
        + ("prediction, std, lower, upper, spread" if calibrated else "prediction, std"),
    ]
    if calibrated:
        lines.append("model.predict(df, params={'coverage': 0.95})  # lower / upper at 95 %")
    lines += [
        "```",
        "",
        "## Package versions",
        "",
    ]
    for k, v in (card.get("versions") or {}).items():
        lines.append(f"- {k} {v}")
    return "\n".join(lines) + "\n"


def _correction_text(c: dict) -> str:
    """How the card's calibration corrects for the product's better-than-a-fold-model prediction:
    the refit-gain factors with their bootstrap standard errors and held-out rows, the averaging
    correction, or none (with the reason the refit gain is not applied)."""
    from .calibration import REPORT_LEVELS, level_name

    names = [level_name(lv) for lv in REPORT_LEVELS]
    if c.get("refit_gain"):
        text = "scaled by the refit-gain factor " + " / ".join(f"{c.get(f'refit_factor_{n}', 1.0):.3f}" for n in names)
        if all(f"refit_factor_se_{n}" in c for n in names):
            text += " (bootstrap se " + " / ".join(f"{c[f'refit_factor_se_{n}']:.3f}" for n in names) + ")"
        return (
            text + f" at {' / '.join(names)} %, measured on {c.get('refit_gain_rows')} training rows the refit held out"
        )
    reason = c.get("refit_gain_reason")
    text = "corrected by the fold models' spread (averaging)" if c.get("averaging") else "with no correction"
    return text + (f" (refit gain not applied: {reason})" if reason else "")


def _uncertainty_lines(card: dict) -> list[str]:
    """The card's "Uncertainty" section: how the intervals were calibrated and their test coverage."""
    from .calibration import REPORT_LEVELS, level_name

    calib = (card.get("ensemble") or {}).get("calibration")
    if not calib:
        return []
    metrics = card.get("metrics") or {}
    per = {"": calib} if "difficulty" in calib else dict(calib)
    lines = ["", "## Uncertainty", ""]
    for target, c in per.items():
        sfx = f"_{target}" if target else ""
        lines += [
            (f"Target {target}: " if target else "")
            + f"`std` is calibrated by normalized conformal prediction ({c.get('difficulty')} difficulty), "
            + _correction_text(c)
            + f", on {c.get('n_calibration')} out-of-fold residuals of the training rows (no test row): about 68 % of "
            f"errors lie within 1 std; `lower` / `upper` cover {100 * float(c.get('coverage', 0.9)):g} %. "
            "`spread` is the uncalibrated spread of the K fold-model stacks.",
            "",
        ]
        if f"coverage_90{sfx}" in metrics:
            lines += ["| nominal coverage | test coverage | mean interval width |", "|---|---|---|"]
            for lv in REPORT_LEVELS:
                name = level_name(lv)
                lines.append(
                    f"| {name} % | {_fmt(metrics.get(f'coverage_{name}{sfx}'))} | "
                    f"{_fmt(metrics.get(f'width_{name}{sfx}'))} |"
                )
            if f"spread_within_1std{sfx}" in metrics:
                lines.append(f"| (uncalibrated spread, 1 std) | {_fmt(metrics[f'spread_within_1std{sfx}'])} | |")
            lines.append("")
    if card.get("reliability"):
        lines += ["![reliability diagram of the test rows](reliability.png)", ""]
    return lines


def write_reliability_png(card: dict, path: Path) -> Optional[Path]:
    """reliability.png (observed vs nominal coverage on the test rows) from a card's curve points."""
    curves = card.get("reliability")
    if not curves:
        return None
    from ..plotting import new_figure, save_figure

    fig = new_figure(5, 5)
    ax = fig.add_subplot()
    for target, c in curves.items():
        ax.plot(c["nominal"], c["observed"], "o-", ms=3, label=target or "test rows")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("observed coverage on the test rows")
    ax.set_title(f"{card.get('task')} fold {card.get('fold')}: conformal intervals")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path


def _not_found(uri: str, err: Exception) -> ModelNotFoundError:
    import mlflow

    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = uri if os.path.exists(uri) else f"{uri} in the tracking store {mlflow.get_tracking_uri()}"
    return ModelNotFoundError(
        f"no model at {where} ({reason}); check the URI or run id (`matfusion leaderboard`, `mlflow ui` list "
        "runs and registered models), or pass --tracking-uri for another store"
    )


def export_model(model_uri: str, to_dir: Union[str, Path]) -> Path:
    """Copy the MLflow model files of ``model_uri`` (or a run id) into ``to_dir`` (a new or
    empty directory) and write README.md (the model card).  Returns the directory."""
    import mlflow

    uri = resolve_model_uri(str(model_uri))
    to_dir = Path(to_dir)
    if to_dir.exists() and any(to_dir.iterdir()):
        raise FileExistsError(f"{to_dir} exists and is not empty")
    to_dir.mkdir(parents=True, exist_ok=True)
    from mlflow.exceptions import MlflowException

    if os.path.isdir(uri):
        shutil.copytree(uri, to_dir, dirs_exist_ok=True)
    else:
        with tempfile.TemporaryDirectory() as d:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d)
            except (MlflowException, OSError) as err:
                raise _not_found(uri, err) from None
            shutil.copytree(local, to_dir, dirs_exist_ok=True)
    if not (to_dir / "MLmodel").is_file():
        raise ValueError(f"{uri} is not an MLflow model (no MLmodel file)")
    cards = list(to_dir.glob("artifacts/card.json"))
    card = json.loads(cards[0].read_text()) if cards else {}
    write_reliability_png(card, to_dir / "reliability.png")
    (to_dir / "README.md").write_text(render_card(card, str(model_uri)))
    return to_dir


# -- prediction on files ---------------------------------------------------------------------------

STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar")
TABLE_SUFFIXES = (".csv", ".json", ".csv.gz", ".json.gz")


def _is_table(path: Path) -> bool:
    return path.name.lower().endswith(TABLE_SUFFIXES)


def _is_structure_file(path: Path) -> bool:
    n = path.name.lower()
    return n.endswith(STRUCTURE_SUFFIXES) or n.startswith(("poscar", "contcar"))


def _report(message: str) -> None:
    print(f"matfusion predict: skipped {message}", file=sys.stderr, flush=True)


def read_inputs(
    inputs: Iterable[Union[str, Path]], structure_column: str = "structure", id_column: Optional[str] = None
) -> tuple[list[str], list, list[str]]:
    """(ids, structures, problems) from files, folders and tables; each bad item is reported on
    stderr (name and reason) and skipped."""
    from ..data.dataset import structure_problem
    from ..data.tables import error_reason as _reason
    from ..data.tables import parse_structure_file as _parse_structure_file
    from ..data.tables import read_csv_table as _read_csv
    from ..data.tables import read_json_table as _read_json

    ids, structures, problems = [], [], []

    def bad(message: str) -> None:
        problems.append(message)
        _report(message)

    def add(rid: str, structure, where: str) -> None:
        # the loaders' sanity checks (volume, elements, overlapping atoms) before featurization
        problem = structure_problem(structure)
        if problem is not None:
            bad(f"{where}: {problem[1]}")
            return
        structures.append(structure)
        ids.append(rid)

    def add_file(file: Path) -> None:
        try:
            text = file.read_bytes().decode("utf-8", errors="replace")
            structure = _parse_structure_file(file, text)
        except Exception as err:  # noqa: BLE001
            bad(f"{file}: cannot parse structure: {_reason(err)}")
            return
        add(file.stem if file.suffix else file.name, structure, str(file))

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and _is_structure_file(p))
            if not files:
                bad(f"{path}: folder holds no CIF/POSCAR files")
            for f in files:
                add_file(f)
        elif path.is_file() and _is_table(path):
            try:
                kind = "json" if ".json" in path.name.lower() else "csv"
                df = _read_json(path) if kind == "json" else _read_csv(path)
            except Exception as err:  # noqa: BLE001
                bad(f"{path}: {err}")
                continue
            if structure_column not in df.columns:
                bad(f"{path}: no column {structure_column!r} (columns: {', '.join(map(str, df.columns))})")
                continue
            idcol = id_column if id_column in df.columns else ("id" if "id" in df.columns else None)
            for i, value in enumerate(df[structure_column].tolist()):
                rid = str(df[idcol].iloc[i]) if idcol else f"{path.stem.split('.')[0]}-row{i}"
                try:
                    structure = parse_structure(value)
                except Exception as err:  # noqa: BLE001
                    bad(f"{path} row {i} (id {rid}): cannot parse structure: {_reason(err)}")
                    continue
                add(rid, structure, f"{path} row {i} (id {rid})")
        elif path.is_file():
            add_file(path)
        else:
            bad(f"{path}: no such file or folder")
    return ids, structures, problems


def load_model(model_uri_or_dir: Union[str, Path]):
    """The pyfunc model of a URI, run id or folder; :class:`ModelNotFoundError` (one line) when
    there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_model_uri(str(model_uri_or_dir))
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as err:
        raise _not_found(uri, err) from None


def _accepts_coverage(model) -> bool:
    params = getattr(getattr(model, "metadata", None), "get_params_schema", lambda: None)()
    return bool(params) and any(p.name == "coverage" for p in params.params)


def predict_structures(
    model_uri_or_dir,
    inputs: Iterable[Union[str, Path]],
    structure_column: str = "structure",
    model=None,
    coverage: Optional[float] = None,
) -> pd.DataFrame:
    """DataFrame(id, prediction, std, lower, upper, spread) for every readable structure in
    ``inputs`` (CIF/POSCAR files, folders of them, CSV/JSON tables with a structure column); bad
    ones are named on stderr and skipped.  A multi-target model gives ``prediction_<t>``,
    ``std_<t>`` ... per target; a model saved before the intervals existed gives id, prediction,
    std.  ``coverage``: the level of ``lower`` / ``upper`` (default the model's).  The model is
    loaded first: a model that does not exist raises :class:`ModelNotFoundError`."""
    model = model or load_model(model_uri_or_dir)
    params = None
    if coverage is not None:
        from .calibration import check_coverage

        check_coverage(coverage, "--coverage")
        if not _accepts_coverage(model):
            raise ValueError("this model has no conformal intervals (saved before they existed): --coverage needs one")
        params = {"coverage": float(coverage)}
    ids, structures, _ = read_inputs(inputs, structure_column)
    if not structures:
        return pd.DataFrame({"id": [], "prediction": [], "std": []})
    frame = pd.DataFrame({"structure": [json.dumps(s.as_dict()) for s in structures]})
    out = model.predict(frame, params=params) if params else model.predict(frame)
    columns = {"id": ids}
    for c in out.columns:  # prediction, std, lower, upper, spread; or <kind>_<t> per target
        columns[str(c)] = np.asarray(out[c], dtype=float)
    return pd.DataFrame(columns)
