"""Sparse-autoencoder dictionaries: reading the published formats (``formats``) and ``steerserve sae``."""
