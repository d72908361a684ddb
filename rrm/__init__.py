"""rrm: Robust Representation Matching and the baselines it is compared with, in one fair harness."""

from rrm.errors import RRMError

__version__ = "0.1.0"
__all__ = ["RRMError", "__version__"]
