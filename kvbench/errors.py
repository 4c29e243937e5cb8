"""The errors kvbench raises for bad input, so every entry point reports them the same way."""


class ConfigError(ValueError):
    """A configuration problem found before any model is loaded (or before any result is written)."""
