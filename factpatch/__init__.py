"""factpatch: hot-patch facts into a served language model.

Parts (one subpackage each; docs/architecture.md has the table): ``models`` (loading, the
architecture adapters, the shared model options), ``editing`` (ROME, MEMIT, AlphaEdit: keys,
values, covariance statistics, deltas, key gates), ``tracing`` (causal tracing), ``evaluation``
(CounterFact metrics, text measures, sequential runs), ``ledger`` (versions in Redis, snapshots,
LoRA export), ``queue`` (jobs in Redis Streams), ``worker`` (edit and trace jobs), ``runtime``
(the live replica, generation, continuous batching, per-request versions), ``server`` (gRPC and
the OpenAI-compatible HTTP API), ``client`` (SDK and CLI), ``rpc`` (generated gRPC code).
"""

__version__ = "0.1.0"
