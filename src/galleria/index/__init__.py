"""Vector indexes: exact (chunked matmul top-k) and FAISS (factory strings)."""
