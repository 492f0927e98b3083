"""The ``sfox-tokens`` command line."""
