"""Preprocessing of real scans for registration: brain masking, affine pre-alignment (elastix), common box,
intensity scaling (MONAI transforms) and a command (``python -m monai_ipear.preprocessing``)."""

from .elastix import ElastixResult, elastix_ddf, elastix_register, elastix_resample, has_elastix
from .transforms import AffinePrealignd, real_scan_preprocessing
