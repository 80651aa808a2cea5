"""What a run leaves behind: its folder's files, the memory bank file, and the MLflow store."""
