"""The package version (one place: ``vitquant.__version__``, exports and the CLI read it)."""

__version__ = "0.1.0"
