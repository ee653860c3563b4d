"""The package version: one place, read by the build (pyproject.toml) and by the store metadata
and the CLI, without importing the package.
"""

__version__ = "0.1.0"
