"""Calibration and evaluation text: WikiText-2, C4, PTB and local files (installed as ``compress.calib``)."""

from .data import CalibConfig, calibration_ids, load_documents, resolve_data_dir

__all__ = ["CalibConfig", "calibration_ids", "load_documents", "resolve_data_dir"]
