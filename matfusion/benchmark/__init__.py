"""``matfusion benchmark``: nested cross-validation over matbench's official folds.

:mod:`.runner` runs (or resumes) a benchmark fold by fold, :mod:`.fold` one fold (search, stack,
predict, record); :mod:`.matbench_io` reads and writes
matbench's side (task metadata, ``results.json.gz``, row alignment); :mod:`.importances` holds
the importances computed after a fold is recorded; :mod:`.report` writes ``report.md`` from the
output folder; :mod:`.commands` registers the ``benchmark`` and ``report`` subcommands.
:mod:`.base` holds the error and the file names they all share.
"""
