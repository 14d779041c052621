"""`python -m pipeline <command>`."""

from pipeline.cli import main

raise SystemExit(main())
