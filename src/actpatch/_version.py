"""The package version, in one place (``pyproject.toml`` reads it too); a leaf module so that
the vocabulary modules can record it without importing the package."""

__version__ = "0.2.0"
