"""The ``accord`` command."""

from accord.cli.app import app, main

__all__ = ["app", "main"]
