"""Test-wide settings: Hypothesis runs derandomized (a fixed example sequence), so CI cannot fail by chance."""

try:
    from hypothesis import settings
except ImportError:  # hypothesis is a dev extra; test_properties.py skips with its reason
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    settings.load_profile("ci")
