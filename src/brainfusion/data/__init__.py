"""Data: slices and tissue masks from MRI sources (layouts, DICOM, subjects, cache, batch stream), the demo set, and condition labels."""
