"""MLflow runs (one per category job) and the Hydra multirun glue that nests them in a sweep."""
