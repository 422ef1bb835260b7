"""Thin Flask services: parse a request model, read through storage, call kernels, write."""
