"""The offline HTML report: plain data in, one self-contained page (inline CSS, no scripts, no
network) with its pictures in a folder beside it.

* :mod:`~pipeline.report.html` - escaping building blocks and the page shell;
* :mod:`~pipeline.report.assets` - hard-linking or copying pictures and raw artifacts beside the page;
* :mod:`~pipeline.report.data` - reading other stages' outputs, the plain data the sections show;
* :mod:`~pipeline.report.sections` - one renderer per section;
* :mod:`~pipeline.report.sanity` - the Adebayo et al. sanity checks behind the sanity section;
* :mod:`~pipeline.report.build` - :func:`build_report`, which puts it together atomically.
"""

from pipeline.report.build import FILES, PAGE, ReportBuilder, build_report

__all__ = ["FILES", "PAGE", "ReportBuilder", "build_report"]
