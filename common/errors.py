"""The error every entry point turns into one line and exit code 2 (common/config.py `Stage`)."""


class ConfigError(Exception):
    """Bad input found before any work starts: the entry points print its one line and exit 2."""
