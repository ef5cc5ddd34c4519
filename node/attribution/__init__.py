"""Lineage and evidence: which datasets an answer owes, and how much."""
