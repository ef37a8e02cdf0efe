"""Learned embedding transforms: PCA, PCA-whitening and friends (pure functions + estimators)."""
