"""Where images come from. Every source yields a records table and a quarantine table.

Records columns: ``image_id`` (sha256 of the file's bytes), ``path`` (absolute), ``label``
(nullable Int64, index into ``class_names``), ``split``, and the box ``box_x0, box_y0, box_x1,
box_y1`` (nullable floats, pixels, exclusive ends), and ``mask`` (path of a PNG of the image's size,
nonzero = object; None when absent). Quarantine columns: ``path``, ``reason``.
"""

from __future__ import annotations

from pipeline.data.sources import DatasetBundle, load_dataset

__all__ = ["DatasetBundle", "load_dataset"]
