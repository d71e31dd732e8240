"""Message bodies from jinja2 templates: built-in, overridden by files in `[mail] templates_dir`,
and per service by sources stored in `services.templates` (editable through the services API).

Templates run in jinja2's immutable sandbox: a provider who edits a service's templates can
shape text, not reach Python objects. `.html` templates autoescape every value; `.txt` ones do
not (plain text has nothing to escape). A stored override that fails at send time falls back to
the built-in template (logged), so a typo never holds a message back.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bookdav.logs import log_event

log = logging.getLogger("bookdav.templates")

BUILT_IN = Path(__file__).parent / "templates"
# Every template a message uses; a service may override any of them.
TEMPLATE_NAMES = ("client.txt", "client.html", "provider.txt", "reminder.txt", "reminder.html")
MAX_TEMPLATE_CHARS = 20_000


class TemplateInvalid(ValueError):
    """A template source does not compile; the message names the template and the line."""


def _environment(folder: str, html: bool) -> ImmutableSandboxedEnvironment:
    loaders: list[jinja2.BaseLoader] = []
    if folder:
        loaders.append(jinja2.FileSystemLoader(folder))
    loaders.append(jinja2.FileSystemLoader(BUILT_IN))
    return ImmutableSandboxedEnvironment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=html,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.Undefined,
    )


@lru_cache(maxsize=8)
def environment(folder: str, html: bool) -> ImmutableSandboxedEnvironment:
    """One environment per (templates folder, escaping): templates are compiled once each."""
    return _environment(folder, html)


@lru_cache(maxsize=256)
def _compiled(source: str, html: bool) -> jinja2.Template:
    return environment("", html).from_string(source)


def check(name: str, source: str) -> None:
    """`TemplateInvalid` unless `name` is a known template and `source` compiles."""
    if name not in TEMPLATE_NAMES:
        raise TemplateInvalid(f"unknown template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateInvalid(f"{name}: longer than {MAX_TEMPLATE_CHARS} characters")
    try:
        environment("", name.endswith(".html")).parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateInvalid(f"{name}: line {exc.lineno}: {exc.message}") from exc


def render(
    name: str, values: dict[str, Any], *, folder: str = "", overrides: dict[str, Any] | None = None
) -> str:
    """Render template `name`: the service's override if it has one, else the file in `folder`,
    else the built-in one."""
    html = name.endswith(".html")
    source = (overrides or {}).get(name)
    if isinstance(source, str):
        try:
            return _compiled(source, html).render(values)
        except Exception as exc:  # a stored override must never stop the message
            log_event(
                log,
                "service template failed, using the default",
                logging.WARNING,
                template=name,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
    return environment(folder, html).get_template(name).render(values)
