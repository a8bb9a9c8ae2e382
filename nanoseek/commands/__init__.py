"""CLI commands, one module each (see nanoseek/cli.py)."""
