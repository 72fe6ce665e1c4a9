"""Executing a manifest: the integer simulator, the float fake-quant reference it is checked
against, and verification levels 1-2. Imports the manifest and the IR, never a method."""
from .reference import Codec, run_reference
from .simulator import ACC_MODES, Simulator
from .verify import numeric, run_verification, structural

__all__ = ["ACC_MODES", "Codec", "Simulator", "numeric", "run_reference", "run_verification", "structural"]
