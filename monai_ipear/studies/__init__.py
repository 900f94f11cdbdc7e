"""Reproducible studies run from the command line (``python -m monai_ipear.studies.<name>``); not imported by the package."""
