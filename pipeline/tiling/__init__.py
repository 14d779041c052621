"""Tiling: tissue mask, the nested 20x/10x/5x grid, QC pictures, and the stage that writes tile stores."""
