"""Threshold and mask post-processing tuned on validation data, applied to held-out test data."""
