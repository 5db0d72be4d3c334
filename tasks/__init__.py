"""Thin Prefect tasks over ``core``: retries, logging and artifacts; no logic of their own."""
