"""The errors kvbench raises for bad input, so every entry point reports them the same way: the CLI
prints the message and exits with status 2, without a traceback (``--debug`` or ``HYDRA_FULL_ERROR=1``
shows it). ``docs/errors.md`` lists them."""


class ConfigError(ValueError):
    """A configuration problem found before any model is loaded (or before any result is written)."""


class DataError(ConfigError):
    """A task's data file that cannot be used; the message names the file and line (or the file and
    sample id) and what is wrong."""
