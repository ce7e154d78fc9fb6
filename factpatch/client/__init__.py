"""The client SDK and the ``factpatch client`` command line."""

from factpatch.client.sdk import TLS, Client, Generated, JobFailed, JobHandle

__all__ = ["TLS", "Client", "Generated", "JobFailed", "JobHandle"]
