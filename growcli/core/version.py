"""growcli's version, in one place (read by the package, the CLI and the provenance written with outputs)."""

__version__ = "0.1.0"
