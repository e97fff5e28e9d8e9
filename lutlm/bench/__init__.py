"""Benchmarks behind `lutlm bench ...`; their results go to benchmarks/results/."""
