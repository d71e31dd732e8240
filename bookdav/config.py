"""bookdav's settings: one typed schema that config.ini, the environment and the docs come from.

Every option lives in `SCHEMA` with its type, default and help. A config file is found at `--config`,
else `$BOOKDAV_CONFIG`, else `./config.ini`; `BOOKDAV_<SECTION>_<KEY>` overrides any key.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A setting is unknown or its value is bad; the message names the key."""


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def _positive_seconds(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 86_400:
        raise ValueError("must be seconds between 0 and 86400, e.g. 0.5")
    return value


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "yes", "true", "on"}:
        return True
    if lowered in {"0", "no", "false", "off"}:
        return False
    raise ValueError("must be true or false")


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return raw

    return parse


def _text(raw: str) -> str:
    return raw


def _minutes_list(raw: str) -> str:
    """Comma-separated minutes ("1440,60"), each 1..525600; kept as text."""
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if not part.isdigit() or not 1 <= int(part) <= 525_600:
            raise ValueError("must be minutes between 1 and 525600, separated by commas")
    return raw


@dataclass(frozen=True)
class Option:
    parse: Callable[[str], Any]
    default: str
    help: str
    is_path: bool = False
    secret: bool = False


SCHEMA: dict[str, dict[str, Option]] = {
    "server": {
        "host": Option(_text, "127.0.0.1", "Address to listen on."),
        "port": Option(_port, "5232", "TCP port to listen on (0 picks a free one)."),
        "base_url": Option(
            _text, "", "Public URL of this server (behind a proxy); default http://host:port."
        ),
        "max_body_bytes": Option(
            _positive_int, "10485760", "Largest request body accepted; larger gets 413."
        ),
        "processes": Option(
            _positive_int,
            "1",
            "Server processes sharing the port (SO_REUSEPORT) and the database; more than one "
            "uses more cores (docs/architecture.md, Processes).",
        ),
        "dav_threads": Option(
            _positive_int,
            "32",
            "Threads serving CalDAV. Radicale sleeps in them after failed logins, so keep headroom.",
        ),
        "allow_private_networks": Option(
            _boolean,
            "false",
            "Let URLs that users supply (webhooks, external calendars) reach loopback, private and "
            "link-local addresses (off: a provider cannot make the server probe its own network).",
        ),
    },
    "storage": {
        "url": Option(
            _text,
            "sqlite:///var/bookdav.sqlite3",
            "SQLAlchemy URL: sqlite:///relative/or/absolute.db or postgresql://user@host/db.",
        ),
    },
    "mail": {
        "smtp_host": Option(_text, "", "SMTP server; empty delivers into the Maildir instead."),
        "smtp_port": Option(_port, "587", "SMTP port."),
        "smtp_username": Option(_text, "", "SMTP login, if the server wants one."),
        "smtp_password": Option(_text, "", "SMTP password.", secret=True),
        "smtp_tls": Option(_one_of("none", "starttls", "tls"), "starttls", "none|starttls|tls."),
        "smtp_verify": Option(
            _boolean,
            "true",
            "Verify the SMTP server's TLS certificate and name (turn off only for a server you "
            "reach over a trusted network).",
        ),
        "smtp_ca_file": Option(
            _text,
            "",
            "PEM file of CA certificates to trust for the SMTP server; empty: the system's.",
            is_path=True,
        ),
        "max_attempts": Option(
            _positive_int,
            "10",
            "Delivery attempts of one outbox row (mail or webhook) before it is marked failed.",
        ),
        "poll_seconds": Option(
            _positive_seconds,
            "0.5",
            "How often the outbox worker looks for due rows (reminders, retries, writes of other "
            "processes); a write through this process's API or pages wakes it at once.",
        ),
        "from_address": Option(_text, "bookdav@localhost", "From: address of notifications."),
        "maildir": Option(
            _text,
            "var/maildir",
            "Maildir that receives mail when no SMTP host is set.",
            is_path=True,
        ),
        "inbound_listen": Option(
            _text,
            "",
            "host:port of an LMTP listener for iMIP replies (e.g. 127.0.0.1:8024); empty: off.",
        ),
        "notify_providers": Option(
            _boolean,
            "true",
            "Email providers about new, moved and cancelled appointments (the default for "
            "providers who have not chosen).",
        ),
        "reminder_minutes": Option(
            _minutes_list,
            "1440,60",
            "Reminders before each appointment, in minutes, comma-separated (services may "
            "override); empty: none.",
        ),
        "templates_dir": Option(
            _text,
            "",
            "Folder of jinja2 templates that override the built-in ones; empty: built-in only.",
            is_path=True,
        ),
    },
    "booking": {
        "allow_client_signup": Option(
            _boolean, "true", "Let anyone register a client account through POST /api/v1/users."
        ),
        "guest_bookings_per_minute": Option(
            _non_negative_int,
            "30",
            "Bookings a minute one address may make without signing in (429 past it; 0: no limit).",
        ),
        "max_search_days": Option(
            _positive_int, "62", "Longest date range one availability search may ask for."
        ),
    },
    "sync": {
        "secret_key": Option(
            _text,
            "",
            "Key that encrypts external calendar credentials at rest (any long random text); "
            "without it, calendars with credentials are refused.",
            secret=True,
        ),
        "interval_seconds": Option(_positive_int, "300", "How often each busy source is pulled."),
        "worker": Option(
            _boolean,
            "true",
            "Pull due busy sources inside `bookdav serve` (false: only `bookdav sync run`, e.g. from "
            "cron, or other processes sharing the database pull them).",
        ),
        "allow_private_networks": Option(
            _boolean,
            "false",
            "Deprecated spelling of `[server] allow_private_networks` (true in either allows).",
        ),
    },
    "logging": {
        "level": Option(_one_of("debug", "info", "warning", "error"), "info", "Log level."),
        "format": Option(_one_of("json", "text"), "text", "json lines or key=value text."),
    },
}


@dataclass(frozen=True)
class Settings:
    """Parsed settings: `settings.get("server", "port")` returns the typed value."""

    values: Mapping[str, Mapping[str, Any]]
    base_dir: Path
    source: str

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    @property
    def storage_url(self) -> str:
        return str(self.values["storage"]["url"])

    @property
    def allow_private_networks(self) -> bool:
        """May user-supplied URLs reach non-public addresses? `[sync] allow_private_networks` is
        the option's older name, still honoured."""
        return bool(
            self.values["server"]["allow_private_networks"]
            or self.values["sync"]["allow_private_networks"]
        )

    @property
    def public_base_url(self) -> str:
        configured = str(self.values["server"]["base_url"]).rstrip("/")
        if configured:
            return configured
        host = self.values["server"]["host"]
        return f"http://{host}:{self.values['server']['port']}"


def find_config_path(explicit: str | None) -> Path | None:
    """`--config`, else `$BOOKDAV_CONFIG`, else `./config.ini` if it exists."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("BOOKDAV_CONFIG")
    if from_env:
        return Path(from_env)
    local = Path("config.ini")
    return local if local.exists() else None


def _resolve_sqlite_url(url: str, base_dir: Path) -> str:
    """Make `sqlite:///relative.db` relative to the config file's folder, not the cwd."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    path_part = url[len(prefix) :]
    if not path_part or path_part.startswith("/") or path_part.startswith(":memory:"):
        return url
    return prefix + str((base_dir / path_part).resolve())


def load_settings(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, str], str] | None = None,
) -> Settings:
    """Read the file (if any), apply environment overrides, then explicit ones, and validate."""
    environ = os.environ if environ is None else environ
    raw: dict[str, dict[str, str]] = {
        section: {key: option.default for key, option in options.items()}
        for section, options in SCHEMA.items()
    }
    base_dir = Path.cwd()
    source = "built-in defaults"
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as exc:
            raise ConfigError(f"{path}: {exc.message.splitlines()[0]}") from exc
        for section in parser.sections():
            if section not in SCHEMA:
                raise ConfigError(f"{path}: unknown section [{section}]")
            for key, value in parser.items(section):
                if key not in SCHEMA[section]:
                    raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
                raw[section][key] = value
        base_dir = path.resolve().parent
        source = str(path)
    for name, value in environ.items():
        if not name.startswith("BOOKDAV_") or name in {"BOOKDAV_CONFIG"}:
            continue
        if name.startswith("BOOKDAV_TEST_"):
            continue
        rest = name[len("BOOKDAV_") :].lower()
        section, _, key = rest.partition("_")
        if section not in SCHEMA or key not in SCHEMA[section]:
            raise ConfigError(f"environment variable {name} names no setting")
        raw[section][key] = value
    for (section, key), value in (overrides or {}).items():
        raw[section][key] = value

    values: dict[str, dict[str, Any]] = {}
    for section, options in SCHEMA.items():
        values[section] = {}
        for key, option in options.items():
            try:
                parsed = option.parse(raw[section][key])
            except ValueError as exc:
                raise ConfigError(
                    f"bad value {raw[section][key]!r} for [{section}] {key}: {exc}"
                ) from exc
            if option.is_path and parsed:
                parsed = str((base_dir / parsed).resolve())
            values[section][key] = parsed
    values["storage"]["url"] = _resolve_sqlite_url(values["storage"]["url"], base_dir)
    return Settings(values=values, base_dir=base_dir, source=source)


def describe_schema() -> str:
    """The schema as Markdown, for docs/configuration.md."""
    lines = ["| section | key | default | meaning |", "|---|---|---|---|"]
    for section, options in SCHEMA.items():
        for key, option in options.items():
            default = option.default or "(empty)"
            lines.append(f"| `[{section}]` | `{key}` | `{default}` | {option.help} |")
    return "\n".join(lines)
