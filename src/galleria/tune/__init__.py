"""Choices made for a gallery from its own images: the tuned default and its calibration
(the pseudo-queries are :mod:`galleria.images.pseudo`)."""
