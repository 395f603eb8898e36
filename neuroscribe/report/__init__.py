"""Reports over a described job: tabular exports (CSV/JSONL/Parquet) and a static offline HTML gallery.

- :func:`write_descriptions` (:mod:`neuroscribe.report.exports`): ``descriptions.{csv,jsonl,parquet}``;
- :func:`write_gallery` (:mod:`neuroscribe.report.gallery`): ``JOBDIR/gallery/index.html`` and one page per layer.
"""

from __future__ import annotations

from .exports import COLUMNS, MILAN_COLUMNS, export_rows, write_descriptions
from .gallery import layer_page_name, script_json, write_gallery

__all__ = ["COLUMNS", "MILAN_COLUMNS", "export_rows", "write_descriptions", "write_gallery", "layer_page_name",
           "script_json"]
