"""Prefect deployments of the training pipeline (see deployments/README.md)."""
