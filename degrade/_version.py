"""The package version, apart from ``degrade/__init__`` so modules can use it without importing the package."""

__version__ = "0.1.0"
