"""The harness that runs every section script of the book and writes the report (``python -m verify``)."""
