"""Pick ensemble members from a finished search in MLflow.

Members are the top ``k`` trials of each group by inner-validation MAE (the only score a
search may select on; the test part is never looked at), a group being a tabular family
(``rf``, ``lgbm``, ``et``) or, for graph
models, a (family, fusion) pair, so the ensemble mixes model kinds instead of taking k
near-copies of the single best family.  Failed trials, trials without a finite val_mae and
trials that never ended (running / interrupted / discarded) are skipped.

Each member's exact trial config is read from its run's ``trial_config.json`` artifact.  For
runs logged before that artifact existed, the config is rebuilt from the run's params
(flattened ``a.b`` keys, values parsed as YAML scalars); a warning says so.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import pandas as pd

from ..families import group_of
from ..tracking.runs import load_run_dict

log = logging.getLogger("matfusion.ensembles")

TRIAL_CONFIG_ARTIFACT = "trial_config.json"
USABLE_STATUSES = ("completed", "pruned", "stopped")


def ranked_candidates(
    client, experiment_id: str, parent_run_id: str, k: int = 2, families: Optional[Sequence[str]] = None
) -> pd.DataFrame:
    """The chosen trials: columns ``trial_id, run_id, family, fusion, group, status, val_mae``,
    best first within each group, groups ordered by their best val_mae."""
    from ..tracking.leaderboard import search_trials

    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    df = search_trials(client, experiment_id, parent_run_id)
    if df.empty:
        return df.assign(group=pd.Series(dtype=str))
    df = df[df["status"].isin(USABLE_STATUSES) & df["val_mae"].notna()].copy()
    df = df[df["val_mae"].map(lambda v: v == v and v != float("inf"))]
    if families:
        df = df[df["family"].isin(list(families))]
    if df.empty:
        return df.assign(group=pd.Series(dtype=str))
    df["group"] = df.apply(group_of, axis=1)
    df = df.sort_values(["val_mae", "trial_id"], kind="stable")
    top = df.groupby("group", sort=False).head(k)
    order = {g: i for i, g in enumerate(top.drop_duplicates("group")["group"])}
    top = top.assign(_g=top["group"].map(order)).sort_values(["_g", "val_mae"], kind="stable").drop(columns="_g")
    return top[["trial_id", "run_id", "family", "fusion", "group", "status", "val_mae"]].reset_index(drop=True)


def _parse_value(text: str):
    import yaml

    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_from_params(params: dict) -> dict:
    """A nested trial config rebuilt from flattened MLflow params (``cgcnn.hidden`` -> ...)."""
    out: dict = {}
    for key, text in params.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = _parse_value(text)
    return out


def load_trial_config(client, run_id: str) -> dict:
    """The run's ``trial_config.json``, else its params rebuilt into a config."""
    names = {a.path for a in client.list_artifacts(run_id)}
    if TRIAL_CONFIG_ARTIFACT in names:
        return load_run_dict(client, run_id, TRIAL_CONFIG_ARTIFACT)
    log.warning("run %s has no %s; rebuilding its config from the logged params", run_id, TRIAL_CONFIG_ARTIFACT)
    config = config_from_params(client.get_run(run_id).data.params)
    if "family" not in config:
        raise ValueError(f"run {run_id}: no {TRIAL_CONFIG_ARTIFACT} and no 'family' param; cannot rebuild its config")
    return config


def select_members(
    client, experiment_id: str, parent_run_id: str, k: int = 2, families: Optional[Sequence[str]] = None
) -> list[dict]:
    """Trial configs of the top-``k`` trials per group (rf, lgbm, et; graph family x fusion) by
    inner-validation MAE, failed trials skipped.  Raises ``ValueError`` if nothing is usable."""
    top = ranked_candidates(client, experiment_id, parent_run_id, k=k, families=families)
    if top.empty:
        raise ValueError(
            f"search run {parent_run_id} has no finished trial with a val_mae"
            + (f" among families {', '.join(families)}" if families else "")
        )
    return [load_trial_config(client, run_id) for run_id in top["run_id"]]
