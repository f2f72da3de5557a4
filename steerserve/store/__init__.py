"""Versioned steering artifacts (per-layer vectors, ActAdd prompt pairs): safetensors + a SQLite manifest."""

from steerserve.store.artifacts import ArtifactMeta, ArtifactStore, StoredPair, StoredVector

__all__ = ["ArtifactMeta", "ArtifactStore", "StoredPair", "StoredVector"]
