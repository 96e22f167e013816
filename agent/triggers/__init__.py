"""Rotation triggers: what wakes a profile besides time."""
