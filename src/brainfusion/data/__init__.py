"""Data: slices from MRI sources (cache, batch stream), the demo set, and condition labels."""
