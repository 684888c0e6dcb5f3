"""Accuracy, latency and reports (torch-free)."""
