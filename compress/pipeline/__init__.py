"""The layer-sequential calibration pipeline."""
