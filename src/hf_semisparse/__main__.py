"""`python -m hf_semisparse ...`: the `hf-semisparse` command line (`cli.py`)."""

from .cli import main

raise SystemExit(main())
