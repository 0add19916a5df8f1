"""The study's trial budget, claimed exactly by any number of processes on any number of hosts.

The rule (the same for threads, processes and hosts, since it reads only the storage): trials
*count* against the budget when they are WAITING (enqueued), RUNNING, COMPLETE or FAIL, except
FAIL trials whose ``status`` is ``interrupted`` (their process died; :mod:`autotune.tune.resume`
retries their configuration). A process first asks Optuna for a trial, then counts the counting
trials numbered below it; if there are ``budget`` or more, its trial is over budget: it is told
PRUNED with ``status`` ``over_budget`` and the process stops.

Why this is exact. Optuna numbers trials under a lock on the study row, so numbers are unique
and every trial numbered below ours is visible when we count. Later trials get higher numbers,
so the count below a trial can only shrink (by interruptions), never grow: a trial once inside
the budget stays inside, and the first ``budget`` counting trials are exactly the ones that run.
When the study is done (nothing RUNNING or WAITING), COMPLETE + FAIL trials, interrupted ones
aside, number exactly the budget. Over-budget PRUNED trials only appear in a race (a cheap
count before asking avoids them otherwise).

This module does not run trials (see :mod:`autotune.tune.study`).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"
OVER_BUDGET = "over_budget"
_COUNTED = ("WAITING", "RUNNING", "COMPLETE", "FAIL")


def counts(trial: Any) -> bool:
    """Whether a trial takes a place in the budget."""
    return (trial.state.name in _COUNTED
            and trial.user_attrs.get("status") != INTERRUPTED)


def spent(study: Any) -> int:
    """Finished trials that count: what progress lines show and what the budget ends at."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.name in ("COMPLETE", "FAIL") and counts(t))


def has_work(study: Any, budget: int) -> bool:
    """Whether asking may give a trial inside the budget: a place is left for a new trial, or
    an enqueued (WAITING) trial is among the first ``budget`` counting trials."""
    inside = sorted((t for t in study.get_trials(deepcopy=False) if counts(t)),
                    key=lambda t: t.number)[:budget]
    return len(inside) < budget or any(t.state.name == "WAITING" for t in inside)


def claim(study: Any, trial: Any, budget: int) -> bool:
    """True if ``trial`` (just asked, RUNNING) is inside the budget; else tells it PRUNED."""
    import optuna

    before = sum(1 for t in study.get_trials(deepcopy=False)
                 if t.number < trial.number and counts(t))
    if before < budget:
        return True
    trial.set_user_attr("status", OVER_BUDGET)
    trial.set_user_attr("reason", f"the study's {budget} trials were claimed by other workers")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    log.debug("trial %d is over the budget of %d; stopping", trial.number, budget)
    return False
