"""``ichscan serve``: the REST API and browser viewer (FastAPI), and the worklist read from a
DICOM receiver's store. Research software, not a medical device."""

from ichscan.serve.app import create_app
from ichscan.serve.uploads import Limits

__all__ = ["Limits", "create_app"]
