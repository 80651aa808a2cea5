"""The Lightning layer: the data module and the module that fits and tests the detector."""
