"""Evaluation: image metrics, reports, and the conditional checks with their classifier judge."""
