"""The gallery store: items keyed by stable ids, vectors per model space, indexes."""
