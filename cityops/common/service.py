"""One lifecycle for every service: settings, command line, logging, then run until stopped.

A service's `main(argv)` is wrapped in `entry_point`; it parses its flags with `ServiceParser`,
reads its settings with `load_settings` and sets up logging with `start_logging`. A bad or
missing setting or flag raises `ConfigError`, which `entry_point` turns into exactly one line
on stderr (`cityops rules: CITYOPS_DATABASE_URL: required, not set`) and exit code 2: no
traceback, and never the value given (it may be a secret).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Mapping
from typing import NoReturn, TypeVar

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings
from pydantic_settings import SettingsError as PydanticSettingsError

from cityops.common.logs import configure_logging
from cityops.common.settings import BaseServiceSettings, principal_env_names

S = TypeVar("S", bound=BaseSettings)
EXIT_CONFIG = 2  # a bad setting or flag: restarting will not help


class ConfigError(Exception):
    """A setting or flag the service cannot run with; its text is one line for the operator."""


class ServiceParser(argparse.ArgumentParser):
    """argparse whose errors are a `ConfigError` (one line, exit 2), not usage text."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage and exiting."""
        raise ConfigError(f"{message} (see --help)")


def env_name(settings_cls: type[BaseSettings], field: str, env: Mapping[str, str]) -> str:
    """The environment variable a field was read from (or would be): `CITYOPS_<FIELD>`.

    A service's own Kafka credentials come from `CITYOPS_<PRINCIPAL>_KAFKA_*` when those are set.
    """
    principal: str = getattr(settings_cls, "kafka_principal", "")
    if principal:
        own = principal_env_names(principal).get(field)
        if own is not None and env.get(own):
            return own
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def _problem(settings_cls: type[BaseSettings], error: ErrorDetails, env: Mapping[str, str]) -> str:
    loc = [str(part) for part in error["loc"]]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "required, not set"
        field = settings_cls.model_fields.get(loc[0]) if loc else None
        if field is not None and field.description:
            message += f" ({field.description})"
    if not loc:
        return message
    name = env_name(settings_cls, loc[0], env)
    return f"{name}{''.join(f'[{part}]' for part in loc[1:])}: {message}"


def describe_problems(
    exc: ValidationError, settings_cls: type[BaseSettings], env: Mapping[str, str]
) -> str:
    """Each invalid or missing setting as `VARIABLE: what is wrong`, on one line.

    The values given are never repeated (`include_input=False`): one of them may be a secret.
    """
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    return "; ".join(_problem(settings_cls, error, env) for error in errors)


def load_settings(settings_cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """The service's settings from the environment; `ConfigError` naming what is wrong."""
    environ: Mapping[str, str] = os.environ if env is None else env
    try:
        return settings_cls()
    except ValidationError as exc:
        raise ConfigError(describe_problems(exc, settings_cls, environ)) from None
    except PydanticSettingsError as exc:
        # a value pydantic-settings could not even decode (e.g. JSON for a complex field);
        # its message names the field and source, never the value
        raise ConfigError(f"bad settings: {exc}") from None


def start_logging(service: str, settings: BaseServiceSettings) -> None:
    """Structured logging on stderr for `service`, as its settings ask."""
    configure_logging(
        service=service,
        instance_id=settings.instance_id,
        level=settings.log_level,
        fmt=settings.log_format,
        repeat_interval_s=settings.log_repeat_interval_s,
    )


def one_line(text: str) -> str:
    """`text` with its lines joined by "; " (a multi-line message printed as one line)."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def entry_point(prog: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    """Wrap a service's `main(argv)`: a `ConfigError` becomes one line on stderr and exit 2."""

    def decorate(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(main)
        def wrapped(argv: list[str]) -> int:
            try:
                return main(argv)
            except ConfigError as exc:
                print(f"{prog}: {one_line(str(exc))}", file=sys.stderr)
                return EXIT_CONFIG

        return wrapped

    return decorate
