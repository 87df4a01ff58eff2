"""The errors that stop a run before it does work, each with a one-line message that says what
to change (`python -m bcl_jax.main` prints it as `bcl_jax: <message>`)."""


class ConfigError(ValueError):
    """A config field with a value that cannot work; the message names field and allowed values."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f'config.{field}={value!r}: {allowed}')
        self.field = field


def require(ok: bool, field: str, value, allowed: str):
    """Stops with a `ConfigError` on `field` unless `ok`."""
    if not ok:
        raise ConfigError(field, value, allowed)


class ChangedConfigError(ValueError):
    """A work directory holds a stage trained under other settings."""
