"""Evaluation: official protocols, metrics and data-set loaders."""
