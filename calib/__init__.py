"""Calibration data and statistics (installed as `ptq.calib`): data sources, preprocessing,
streaming observers, collection over a captured graph. Imports only the foundation modules and `ptq.ir`."""
from .observers import Encoding, Histogram, choose_encoding
from .preprocess import PRESETS, Preprocess
from .sources import DataSource, open_source

__all__ = ["DataSource", "Encoding", "Histogram", "PRESETS", "Preprocess", "choose_encoding", "open_source"]
