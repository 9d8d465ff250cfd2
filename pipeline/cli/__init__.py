"""The ``linewatch`` command: one module per command group."""
