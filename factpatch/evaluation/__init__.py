"""Edit-quality evaluation (CounterFact, Meng et al. 2022)."""
