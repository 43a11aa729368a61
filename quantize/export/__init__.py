"""Checkpoint writers, one module per format."""
