"""Reading and writing head CT: DICOM files, folders and zips, NIfTI, PNG/JPEG slices."""

from ichscan.io.load import input_kind, load
from ichscan.io.nifti import read_nifti, write_nifti
from ichscan.io.series import discover

__all__ = ["discover", "input_kind", "load", "read_nifti", "write_nifti"]
