"""Pictures of attention: sparse-pattern grids (matplotlib, imported lazily)."""

from attnkit.viz.patterns import save_pattern_grid

__all__ = ["save_pattern_grid"]
