"""Online backfilling: upgrade a live gallery from an old model to a new one.

``job`` (start / run / status / finish, resumable and kill -9 safe), ``merge``
(pure merge rules, calibrations and backfill metrics), ``psi`` (the reverse
transformation new -> old, regression or metric-compatible), ``bct`` (the
backward-compatible-training baseline) and ``search`` (:class:`BackfillSearcher`,
search while the backfill runs). See docs/upgrade.md.
"""

from galleria.upgrade.finish import UpgradeStatus, finish_upgrade, upgrade_status
from galleria.upgrade.job import run_upgrade, start_upgrade
from galleria.upgrade.state import UpgradeError, UpgradeState, active_upgrade

__all__ = [
    "UpgradeError",
    "UpgradeState",
    "UpgradeStatus",
    "active_upgrade",
    "finish_upgrade",
    "run_upgrade",
    "start_upgrade",
    "upgrade_status",
]
