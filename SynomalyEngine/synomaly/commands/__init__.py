"""Commands: the ``synomaly`` command line (one module per command), cohorts, the demo, and Slicer's worker."""
