"""`flnode report`: one self-contained report.html for a run directory (reader.py reads
summary.json and the members' metrics.jsonl, plots.py draws, render.py writes the HTML)."""

from node.ops.report_html.reader import load_run
from node.ops.report_html.render import negative_gain_note, write_report, write_text_atomic

__all__ = ["load_run", "negative_gain_note", "write_report", "write_text_atomic"]
