"""The manifest: its format, how it is built from a method's integer weights, stored, loaded and
validated, and every weight scheme's rules. The only seam between the methods and the back ends:
it imports no method, and a tool that reads manifests needs nothing else of ptq."""
from .format import FORMAT, MANIFEST_FILE, TENSOR_FILE, VERSION, Manifest, dumps
from .schemes import SCHEMES, point_bits
from .store import load, save, sha256_file
from .summary import weight_summary
from .validate import validate

__all__ = ["FORMAT", "MANIFEST_FILE", "Manifest", "SCHEMES", "TENSOR_FILE", "VERSION", "dumps", "load", "point_bits",
           "save", "sha256_file", "validate", "weight_summary"]
