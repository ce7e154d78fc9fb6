"""The worker: takes edit and trace jobs from the queue, computes, commits, acknowledges."""

from factpatch.worker.worker import Worker

__all__ = ["Worker"]
