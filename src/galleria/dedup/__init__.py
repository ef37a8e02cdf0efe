"""Near-duplicate detection: ``galleria dedup`` (global candidates, local verification).

::

    from galleria.dedup import DedupConfig, find_duplicates
    report = find_duplicates(gallery, DedupConfig(candidate=0.8))
    report.groups          # [[id, id, ...], ...]: copies of the same picture
    report.to_dict()       # the JSON report

The rule and its thresholds: :mod:`galleria.dedup.core`; the HTML page:
:mod:`galleria.dedup.report`.
"""

from galleria.dedup.core import DedupConfig, calibrated_threshold, candidate_pairs, decide, groups
from galleria.dedup.run import Candidates, DedupReport, find_duplicates, score_candidates

__all__ = ["Candidates", "DedupConfig", "DedupReport", "calibrated_threshold",
           "candidate_pairs", "decide", "find_duplicates", "groups", "score_candidates"]
