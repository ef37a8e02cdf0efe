"""Re-rankers: MDS similarity embeddings (pure cores; pipelines in galleria.search.pipelines)."""
