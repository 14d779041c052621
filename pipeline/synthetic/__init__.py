"""Synthetic data for tests, benchmarks and the demo; not a pipeline stage.

`slides`: pyramidal TIFFs streamed tile by tile; `demo`: the H&E-like demo cohort (slides and
sheet); `bags`: feature stores of a cohort whose label needs a fine and a coarse scale.
"""
