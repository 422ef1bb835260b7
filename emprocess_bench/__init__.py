"""Benchmarks behind ``emprocess bench``: they drive the services' own code and print figures."""
