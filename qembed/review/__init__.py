"""`qembed review`: measure the relevance of synthetic pairs on a labelled sample — a seeded, stratified
sample kept in a labels file, a small web page to label it (several reviewers), an LLM judge, and a report
of relevance accuracy (raw vs filtered, with Wilson intervals), the cosine threshold and agreement."""

from qembed.review.labels import LabelStore, create_labels_file, read_review
from qembed.review.report import build_report, cohen_kappa, format_report, wilson_interval

__all__ = ["LabelStore", "build_report", "cohen_kappa", "create_labels_file", "format_report", "read_review",
           "wilson_interval"]
