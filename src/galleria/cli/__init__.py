"""The ``galleria`` command line."""
