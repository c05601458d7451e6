"""Offline demo material for ONE-PEACE (a small tri-modal data set built from local sources)."""
