"""Thin Flask services: parse a request model, read through storage, call kernels, write.

Slices are decoded by libvips (:mod:`emprocess.images`) after the header checks; OpenCV
decodes only the services' own tiles. Its own pixel limit is set when a service's app is
created (:func:`emprocess.services.common.create_service_app`), before any OpenCV decode,
to the largest image the services take: a second line behind the checks.
"""
