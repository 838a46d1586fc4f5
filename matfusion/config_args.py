"""The command-line flags every config-reading command shares: ``--set KEY=VALUE`` and
``--data-dir``, and the config they give (``matfusion search``, ``featurize``, ``validate``,
``benchmark``)."""

from __future__ import annotations

import argparse


def add_config_flags(p: argparse.ArgumentParser, example: str = "search.num_samples=10") -> None:
    """``--set`` (repeatable overrides, e.g. ``example``) and ``--data-dir``."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )
    p.add_argument("--data-dir", help="folder with the datasets (default: $MATFUSION_DATA or ../shared/data)")


def load_config_of(args, *extra: str):
    """The validated config of ``args.config`` with the ``--set`` overrides, ``--data-dir`` and
    ``extra`` overrides applied."""
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "data_dir", None):
        overrides.append(f"data.data_dir={args.data_dir}")
    return load_config(args.config, overrides + list(extra))
