"""Reports: metrics figures, heatmaps, cross-attention read-outs, tiling summaries, QuPath export, cohort QC."""
