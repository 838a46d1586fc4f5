"""MLflow tracking of searches: the trial logger callback (:mod:`.logger`), run queries
(:mod:`.runs`), THE leaderboard computed from the runs (:mod:`.leaderboard`), the search report
logged to the parent run (:mod:`.report`), the cluster's tracking server (:mod:`.server`) and
the ``leaderboard`` / ``mlflow-server`` subcommands (:mod:`.commands`).

Submodules are imported explicitly (``from matfusion.tracking.leaderboard import ...``) so that
importing the package costs nothing.
"""
