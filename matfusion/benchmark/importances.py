"""Importances of a fitted stacked ensemble, computed on a fold's test rows after its predictions
were recorded (they never feed back into a prediction): which modalities (crystal graph, Magpie
vector) a member uses, the permutation importance of the two modalities, and the impurity and
permutation importance of the descriptor columns in the tabular (RF) member.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..families import TABULAR
from ..families.fusion import DESCRIPTOR_FUSIONS


def _mae(pred, y) -> float:
    return float(np.mean(np.abs(np.asarray(pred, dtype=np.float64) - y)))


def uses_modalities(config: dict) -> tuple[bool, bool]:
    """(uses the crystal graph, uses the Magpie vector) of a member config."""
    family = config.get("family")
    if family in TABULAR:
        return False, True
    fusion = str((config.get(family) or {}).get("fusion", "none"))
    return True, fusion in DESCRIPTOR_FUSIONS


def modality_importance(
    ensemble, descriptors: np.ndarray, graphs, targets: np.ndarray, rows: Sequence[int], repeats: int = 3, seed: int = 0
) -> dict:
    """Permutation importance of the two modalities on ``rows``: the rise in MAE when the crystal
    graphs (or the Magpie vectors) are shuffled across the rows while the other input stays in
    place, for every member that uses both (fused models) and for the whole ensemble.
    ``{"base_mae": {...}, "graph": {...}, "magpie": {...}}`` keyed by member name and
    ``ensemble``; each value the mean over ``repeats`` shuffles."""
    from ..trainables.trial_data import pack_rows

    rows = np.asarray(rows, dtype=np.int64)
    y = np.asarray(targets, dtype=np.float64)[rows]
    base_part = pack_rows(descriptors, graphs, targets, rows)
    base = ensemble.part_outputs(base_part, descriptors, rows)
    uses = [uses_modalities(m) for m in ensemble.members]
    fused = [j for j, (g, m) in enumerate(uses) if g and m]
    names = ["ensemble"] + [ensemble.names_[j] for j in fused]

    def scores(out):
        return {"ensemble": _mae(out["mean"], y), **{ensemble.names_[j]: _mae(out["members"][:, j], y) for j in fused}}

    base_scores = scores(base)
    out = {
        "base_mae": base_scores,
        "graph": dict.fromkeys(names, 0.0),
        "magpie": dict.fromkeys(names, 0.0),
        "repeats": repeats,
        "n_rows": int(len(rows)),
        "fused_members": [ensemble.names_[j] for j in fused],
    }
    if graphs is None or repeats < 1:
        return out
    rng = np.random.default_rng([seed, 4242])
    for _ in range(repeats):
        perm = rng.permutation(len(rows))
        # graphs shuffled, Magpie in place
        part = pack_rows(descriptors, graphs, targets, rows[perm])
        part.update(descriptors=base_part["descriptors"], y=base_part["y"], row=rows)
        s = scores(ensemble.part_outputs(part, descriptors, rows, [j for j, u in enumerate(uses) if u[0]], base))
        for n in names:
            out["graph"][n] += (s[n] - base_scores[n]) / repeats
        # Magpie shuffled, graphs in place
        part = dict(base_part, descriptors=np.ascontiguousarray(base_part["descriptors"][perm]))
        s = scores(ensemble.part_outputs(part, descriptors, rows, [j for j, u in enumerate(uses) if u[1]], base))
        for n in names:
            out["magpie"][n] += (s[n] - base_scores[n]) / repeats
    return out


def rf_importance(
    ensemble,
    descriptors: np.ndarray,
    targets: np.ndarray,
    rows: Sequence[int],
    columns: Sequence[str],
    repeats: int = 3,
    seed: int = 0,
) -> Optional[dict]:
    """Of the ensemble's first ``rf`` member (else its first tabular member), over its K fold
    models: the impurity importance of each descriptor (Magpie) column, mean over the fold models
    (where the models have ``feature_importances_``), and, with ``repeats`` > 0, the permutation
    importance on ``rows``: the rise in MAE of the member's fold-averaged prediction when one
    column is shuffled across the rows.  None without a tabular member."""
    from ..trainables.trial import predict_from_state

    candidates = [i for i, m in enumerate(ensemble.members) if m.get("family") == "rf"]
    candidates += [i for i, m in enumerate(ensemble.members) if m.get("family") in TABULAR and i not in candidates]
    if not candidates:
        return None
    j = candidates[0]
    family = ensemble.members[j]["family"]
    states = [fold_states[j] for fold_states in ensemble.fold_states_]
    configs = [ensemble._member_config(j, k) for k in range(len(states))]
    width = descriptors.shape[1]
    names = list(columns) if len(columns) == width else [f"feature_{i}" for i in range(width)]
    impurity = None
    models = [st.get(family) for st in states]
    if all(isinstance(m, (list, tuple)) and m and hasattr(m[0], "feature_importances_") for m in models):
        impurity = np.mean([m[0].feature_importances_ for m in models], axis=0).tolist()
    out = {
        "member": ensemble.names_[j],
        "family": family,
        "columns": names,
        "impurity": impurity,
        "permutation": None,
        "repeats": repeats,
    }
    if repeats < 1:
        return out
    rows = np.asarray(rows, dtype=np.int64)
    y = np.asarray(targets, dtype=np.float64)[rows]
    X = np.array(descriptors[rows], dtype=np.float64)

    def predict(x):
        part = {"descriptors": x, "y": y, "row": rows}
        return np.mean(
            [
                np.asarray(predict_from_state(c, st, part, ensemble.graph_params_), dtype=np.float64).reshape(len(rows))
                for c, st in zip(configs, states)
            ],
            axis=0,
        )

    base = _mae(predict(X), y)
    rng = np.random.default_rng([seed, 777])
    perm_imp = np.zeros(width)
    for c in range(width):
        original = X[:, c].copy()
        for _ in range(repeats):
            X[:, c] = original[rng.permutation(len(rows))]
            perm_imp[c] += (_mae(predict(X), y) - base) / repeats
        X[:, c] = original
    out["permutation"] = perm_imp.tolist()
    out["base_mae"] = base
    return out
