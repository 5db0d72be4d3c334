"""recflow core: plain typed Python (no Prefect) for every pipeline step."""

__version__ = "0.1.0"
