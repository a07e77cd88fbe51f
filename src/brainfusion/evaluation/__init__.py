"""Evaluation: image metrics, reports, the conditional checks with their classifier judge, and the segmenter judge."""
