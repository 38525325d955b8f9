"""Studies: sweeps over grids of runs, comparisons, reports."""
