"""Calibration data and statistics: data sources, preprocessing, streaming observers, collection."""
from .observers import Encoding, Histogram, choose_encoding
from .preprocess import PRESETS, Preprocess
from .sources import DataSource, open_source

__all__ = ["DataSource", "Encoding", "Histogram", "PRESETS", "Preprocess", "choose_encoding", "open_source"]
