"""Search: image queries against a gallery, post-processing (query expansion, DBA)."""
