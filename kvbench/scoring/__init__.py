"""Scorers: pure functions from (prediction, gold) to a score, one module per task family."""
