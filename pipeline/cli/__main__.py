"""``python -m pipeline.cli``: the ``linewatch`` command."""

from pipeline.cli import main

raise SystemExit(main())
