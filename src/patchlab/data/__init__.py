"""MVTec AD layout datasets and their Lightning data module."""
