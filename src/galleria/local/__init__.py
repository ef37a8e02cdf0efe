"""Local-feature search: ASMK and CANN indexes, matching and spatial verification.

See :mod:`galleria.local.base` for the index contract and
:func:`galleria.local.factory.create_local_index` to build one by name.
"""
