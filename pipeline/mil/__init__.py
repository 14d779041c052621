"""Multiple-instance learning: bags from feature stores, models (torch only), training, splits, metrics and statistics."""
