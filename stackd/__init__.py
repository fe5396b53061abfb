"""stackd: run multi-service stacks on one Linux host, with no daemon and no registry."""

__version__ = "0.1.0"

__all__ = ["__version__"]
