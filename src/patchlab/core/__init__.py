"""PatchCore maths in plain torch: no Lightning, Hydra, MLflow or Optuna in here."""
