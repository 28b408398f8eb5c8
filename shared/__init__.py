"""Types, settings, errors and naming shared by broker, workers and gateway.

This package imports none of the others (``shared`` <- ``broker`` <- ``workers``, ``gateway``).
"""
