"""Benchmarks of the appliance: stand-alone scripts (acquisition.py, uplink.py, inference.py) and
the end-to-end harness (``python -m benchmarks`` / ``appliance bench``, :mod:`benchmarks.bench`).

Not installed with the package: run from a source checkout (the repository root on sys.path).
"""
