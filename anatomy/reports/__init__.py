"""Report understanding for fVLM: radiology report text -> per-anatomy texts, normal flags and task labels.

    from anatomy.reports import ReportParser, parse_report
    result = parse_report(text, impression=None, parser=ReportParser("ct-rate"))

See :mod:`anatomy.reports.parser` for the steps and ``configs/reports/`` for the rules and presets.
"""

from anatomy.reports.context import ContextRuleError, ContextRules
from anatomy.reports.parser import (
    ABSENT,
    NOT_MENTIONED,
    PRESENT,
    STATUSES,
    UNCERTAIN,
    AnatomyReport,
    Evidence,
    ReportParser,
    ReportResult,
    UnassignedFinding,
    parse_report,
)
from anatomy.reports.preset import PresetError, ReportPreset, load_preset
from anatomy.reports.text import Span, clean_text, split_clauses, split_sentences

__all__ = [
    "ABSENT", "NOT_MENTIONED", "PRESENT", "STATUSES", "UNCERTAIN", "AnatomyReport", "ContextRuleError",
    "ContextRules", "Evidence", "PresetError", "ReportParser", "ReportPreset", "ReportResult", "Span",
    "UnassignedFinding", "clean_text", "load_preset", "parse_report", "split_clauses", "split_sentences",
]
