"""`python -m fh_compile COMMAND ...` (see fh_compile.cli)."""

from fh_compile.cli import main

raise SystemExit(main())
