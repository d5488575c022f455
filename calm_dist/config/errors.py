"""The one exception type for bad configuration, so callers can catch it and print one message."""


class ConfigError(ValueError):
    """A configuration file, override or combination of settings is invalid. The message names the
    offending dotted key(s) and, where there is one, the fix."""
