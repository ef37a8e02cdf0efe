"""Image decoding and listing of image sources (folders, manifests)."""
