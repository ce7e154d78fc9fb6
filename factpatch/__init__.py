"""factpatch: hot-patch facts into a served language model.

Parts (one subpackage each): ``models`` (loading + architecture adapters), ``editing``
(ROME: keys, values, covariance statistics, deltas), ``evaluation`` (CounterFact metrics).
"""

__version__ = "0.1.0"
