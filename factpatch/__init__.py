"""factpatch: hot-patch facts into a served language model.

Parts (one subpackage each; docs/architecture.md has the table): ``models`` (loading, the
architecture adapters, the shared model options), ``editing`` (ROME, MEMIT, AlphaEdit,
composed from ``keys`` (k at the subject), ``targets`` (the δ / v* optimisation) and ``solve``
(the update's solves); covariance statistics, deltas, key gates), ``tracing`` (causal tracing),
``evaluation`` (CounterFact metrics, text measures, sequential runs), ``ledger`` (versions in
Redis, the one writer of new versions, snapshots, LoRA export), ``queue`` (jobs in Redis
Streams), ``worker`` (the job loop; the edit transaction in ``worker.edit``), ``runtime`` (the
live replica that applies versions, generation, continuous batching, per-request versions),
``server`` (gRPC and the OpenAI-compatible HTTP API), ``client`` (SDK and CLI), ``rpc``
(generated gRPC code).  Research code (replays, sweeps, experiments) lives in ``research/``
beside the package and is never imported by it.
"""

__version__ = "0.1.0"
