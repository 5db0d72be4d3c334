"""Data: sources, extract, snapshot store, pseudonymisation, validation. Imports neither torch nor RecBole."""
