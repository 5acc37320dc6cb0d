"""Pictures of attention: pattern grids, head heatmaps; HTML pages of patterns and heads."""

from attnkit.viz.head_view import head_view_html, save_head_view
from attnkit.viz.heatmap import save_head_grid
from attnkit.viz.pattern_view import pattern_view_html, save_pattern_view
from attnkit.viz.patterns import save_pattern_grid

__all__ = [
    "head_view_html",
    "pattern_view_html",
    "save_head_grid",
    "save_head_view",
    "save_pattern_grid",
    "save_pattern_view",
]
