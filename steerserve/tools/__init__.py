"""Offline tools that make artifacts (vectors, pairs) from data, on the hf engine's model."""
