"""Using a trained model: load it safely, predict, export graphs, serve through MLflow."""
