"""Calibration: statistics capture and the weighted k-means used to fit codebooks."""

from .kmeans import assign, lloyd_step, weighted_kmeans, weighted_sse

__all__ = ["assign", "lloyd_step", "weighted_kmeans", "weighted_sse"]
