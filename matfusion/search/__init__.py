"""Tuner wiring: OptunaSearch + ASHA under Ray Tune, MLflow logging, leaderboard.
(Imports no model class: trials are run through ``matfusion.trainables.trial``.)"""
