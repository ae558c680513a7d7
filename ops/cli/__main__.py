"""`python -m ops.cli` = `fedmask` (used by tests to start services with the current interpreter)."""

from ops.cli import main

main()
