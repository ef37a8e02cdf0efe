"""Extraction: images -> embeddings, batched, threaded, resumable."""
