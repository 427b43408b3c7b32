"""Entry points (`python -m scripts.NAME`). Importing this package does nothing: process-wide
settings (malloc tuning, library log levels) are applied by each entry point when it runs as a
program (scripts/terminal.py `run`), never at import."""
