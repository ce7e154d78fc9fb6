"""The job queue: edit and trace jobs in Redis Streams, claimed by workers, acknowledged only
once their result is durable.  States: :mod:`factpatch.queue.states`."""

from factpatch.queue.job import KINDS, Job, LeaseLostError, QueueError, UnknownJobError
from factpatch.queue.queue import GROUP, JobQueue, Lease, new_consumer_name
from factpatch.queue.states import TERMINAL_STATES, TRANSITIONS, JobState, can_transition

__all__ = [
    "GROUP",
    "KINDS",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Job",
    "JobQueue",
    "JobState",
    "Lease",
    "LeaseLostError",
    "QueueError",
    "UnknownJobError",
    "can_transition",
    "new_consumer_name",
]
