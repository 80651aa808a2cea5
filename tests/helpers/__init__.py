"""Test helpers: real configs on synthetic data, synthetic categories, a local MLflow server."""
