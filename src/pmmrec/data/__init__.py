"""Data layer: domain folders, preparation from raw logs, the image database, item features, the built-in world."""
