"""Causal tracing (Meng et al. 2022, section 2): which hidden states carry a fact."""

from factpatch.tracing.core import KINDS, TraceResult, encode_prompt, trace, trace_kinds

__all__ = ["KINDS", "TraceResult", "encode_prompt", "trace", "trace_kinds"]
