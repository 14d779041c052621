"""Deployment: a trained run's recorded settings, and prediction on new slides with it."""
