"""ichscan: find intracranial hemorrhage on head CT.

Research software, not a medical device: do not use it for diagnosis or patient care.
"""

from ichscan.errors import IchscanError, InputError
from ichscan.io import discover, load, write_nifti
from ichscan.scan import Scan

__version__ = "0.1.0"
__all__ = ["IchscanError", "InputError", "Scan", "__version__", "discover", "load", "write_nifti"]
