"""Great Expectations suites, shipped as package data (read with importlib.resources)."""
