"""Data layer: sources, robust decoding, preprocessing, label readers and demo data."""
