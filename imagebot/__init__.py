"""The application shell: the command line and the wiring above ``bot/`` and ``adapters/``."""
