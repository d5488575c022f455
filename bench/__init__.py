"""Benchmarks: each compares two things measured in the same run and prints the ratio."""
