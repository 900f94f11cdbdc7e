"""Model Zoo packaging of this repository's bundle: ``python -m bundle.make_bundle build|check``."""
