"""A job's states and the moves between them: the one place they are written down.

::

      submit
        │
        ▼
     QUEUED ─────── cancel ──────────────────────────────────────▶ CANCELLED
      │   ▲                                                           ▲
 claim│   │ lease.fail(retry=True) with attempts left                 │ lease.cancelled(), or a
      │   │ (a new stream entry; the old one is acked)                │ claim that finds the cancel
      ▼   │                                                           │ requested (cancel on a
     RUNNING ─────────────────────────────────────────────────────────┘ running job only sets it)
      │  ↺ reclaimed: its worker stopped heartbeating, a live one takes it (attempts + 1)
      ├── lease.succeed(result) ─────────────────────────────────▶ SUCCEEDED
      ├── lease.fail(error, retry=False) ────────────────────────▶ FAILED
      └── attempts used up (a failed last attempt, or its worker ─▶ DEAD (dead-lettered,
          died during the last attempt)                                with the reason)

     QUEUED ──▶ DEAD as well: a delivery that finds the attempts already used up (only when
     max_attempts was lowered while the job waited).

SUCCEEDED, FAILED, CANCELLED and DEAD are terminal: nothing moves a job out of them.  Every
claim counts as an attempt.  The Lua scripts that change a job's state check each move against
:data:`TRANSITIONS` (it is compiled into them, see :func:`lua_transition_table`), so a move not
in this table cannot happen.
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"  # dead-lettered: attempts used up

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    def __str__(self) -> str:
        return self.value


TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DEAD}
)

#: state -> the states a job may move to from it.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.DEAD}),
    JobState.RUNNING: frozenset(
        {
            JobState.RUNNING,  # reclaimed from a dead worker
            JobState.QUEUED,  # failed, retried
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.DEAD,
        }
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.DEAD: frozenset(),
}


def can_transition(source: JobState | str, target: JobState | str) -> bool:
    """Whether a job in ``source`` may move to ``target``."""
    return JobState(target) in TRANSITIONS[JobState(source)]


def lua_transition_table() -> str:
    """:data:`TRANSITIONS` and :data:`TERMINAL_STATES` as Lua, for the queue's scripts."""
    rows = []
    for source in JobState:
        targets = ", ".join(f'["{t.value}"] = true' for t in sorted(TRANSITIONS[source]))
        rows.append(f'["{source.value}"] = {{{targets}}}')
    terminal = ", ".join(f'["{s.value}"] = true' for s in sorted(TERMINAL_STATES))
    return (
        f"local ALLOWED = {{{', '.join(rows)}}}\n"
        f"local TERMINAL = {{{terminal}}}\n"
        "local function allowed(a, b) return a ~= nil and ALLOWED[a] ~= nil "
        "and ALLOWED[a][b] == true end\n"
    )
