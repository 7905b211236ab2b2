"""Helpers shared by the test modules (the service harness, a toy for the data-driven fusion methods)."""
