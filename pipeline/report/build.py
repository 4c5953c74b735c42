"""Build the run's page: ``<run>/report.html`` with its pictures and raw artifacts in
``<run>/report_files/``. The folder is filled beside the old one and swapped in at the end, so a
failed build leaves the previous report whole."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.cache import atomic_write_bytes
from pipeline.report import data as rd
from pipeline.report.assets import Assets
from pipeline.report.html import Section, page
from pipeline.report.sections import (audit_section, explanations_section, metrics_section, neurons_section,
                                      overview_section, reliance_section, sanity_section)

PAGE = "report.html"
FILES = "report_files"


class ReportBuilder:
    """Collects files into a temporary folder, then publishes page and folder together."""

    def __init__(self, out_dir: Path, mode: str = "hardlink", page_name: str = PAGE, files_name: str = FILES) -> None:
        self.out_dir = out_dir
        self.page_path = out_dir / page_name
        self.files_dir = out_dir / files_name
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{files_name}.", suffix=".tmp"))
        self.assets = Assets(self.tmp, files_name, mode)

    def publish(self, title: str, subtitle: str, sections: Sequence[Section]) -> Path:
        """Write the page and move the files folder into place; returns the page's path."""
        text = page(title, subtitle, sections)
        old = None
        if self.files_dir.exists():
            old = self.files_dir.with_name(f".{self.files_dir.name}.old.{os.getpid()}")
            os.replace(self.files_dir, old)
        os.replace(self.tmp, self.files_dir)
        atomic_write_bytes(self.page_path, text.encode("utf-8"))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.page_path

    def discard(self) -> None:
        """Remove the temporary folder (after a failure)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_report(run_dir: Path, title: str, subtitle: str, source_dir: Path | None = None,
                 overview: rd.Overview | None = None,
                 overview_note: str = "", neurons: Sequence[rd.StoreNeuron] | None = None, store_note: str = "",
                 sanity: Sequence[rd.SanityResult] | None = None, sanity_note: str = "",
                 max_final_spearman: float = 0.5, max_class_spearman: float = 0.95,
                 max_explained: int | None = None, mode: str = "hardlink",
                 max_input_spearman: float = 0.8, microscope: str | None = None) -> tuple[Path, Assets]:
    """The report in ``run_dir`` from plain data (overview, store neurons, sanity results) plus what the
    other stages wrote into ``source_dir`` (default ``run_dir``): explain, visualize and audit outputs;
    ``microscope`` is the model browser's index page relative to ``run_dir`` (None: not built).
    Returns the page's path and its assets."""
    source_dir = source_dir or run_dir
    builder = ReportBuilder(run_dir, mode)
    try:
        assets = builder.assets
        table, metrics = rd.read_explain(source_dir)
        fragment, audit = rd.read_audit(source_dir)
        sections = [
            overview_section(overview, overview_note),
            neurons_section(neurons, store_note, *rd.read_visualize(source_dir), assets, microscope),
            explanations_section(table, assets, max_explained),
            metrics_section(metrics),
            reliance_section(*rd.read_reliance(source_dir, audit), assets),
            sanity_section(sanity, sanity_note, max_final_spearman, max_class_spearman, max_input_spearman, assets),
            audit_section(fragment, audit),
        ]
        return builder.publish(title, subtitle, sections), assets
    except BaseException:
        builder.discard()
        raise
