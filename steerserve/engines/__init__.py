"""Engines batch requests and generate. Both implementations apply the same runtime ops."""
