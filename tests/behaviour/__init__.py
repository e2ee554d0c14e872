"""Behaviour suites across the whole engine: resume, faults, bad input, end to end, clusters."""
