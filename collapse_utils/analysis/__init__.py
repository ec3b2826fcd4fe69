"""Analysis: run records into tidy tables and the statistical tests (no torch import)."""
