"""Thin Flask services: parse a request model, read through storage, call kernels, write.

Slices are decoded by libvips (:mod:`emprocess.images`) after the header checks; OpenCV
decodes only the services' own tiles. Its own pixel limit is set here, before any
OpenCV decode, to the largest image the services take: a second line behind the checks.
"""

import os

from emprocess.settings import ServiceEnv, load

_env = load(ServiceEnv)
os.environ.setdefault(
    "OPENCV_IO_MAX_IMAGE_PIXELS", str(max(_env.align_max_pixels, _env.emwrite_max_pixels))
)
