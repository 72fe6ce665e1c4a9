"""Calibration data and statistics (installed as `ptq.calib`): data sources, preprocessing,
streaming observers, collection over a captured graph. Imports only the foundation modules and `ptq.ir`.

The names below load on first use, so `ptq.calib.progress` (what every command line imports)
does not pay for torch."""
from typing import Any

__all__ = ["DataSource", "Encoding", "Histogram", "PRESETS", "Preprocess", "choose_encoding", "open_source"]


def __getattr__(name: str) -> Any:
    if name in ("Encoding", "Histogram", "choose_encoding"):
        from . import observers
        return getattr(observers, name)
    if name in ("PRESETS", "Preprocess"):
        from . import preprocess
        return getattr(preprocess, name)
    if name in ("DataSource", "open_source"):
        from . import sources
        return getattr(sources, name)
    raise AttributeError(f"module 'ptq.calib' has no attribute {name!r}")
