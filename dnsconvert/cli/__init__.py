"""The ``dnsconvert`` command line: thin click commands over the library API."""

from .main import cli, main

__all__ = ["cli", "main"]
