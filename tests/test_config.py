"""Settings: the file, environment overrides, relative paths and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bookdav.config import ConfigError, describe_schema, find_config_path, load_settings

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.ini"


def test_embedded_default_needs_no_other_service() -> None:
    settings = load_settings(REPO_CONFIG, environ={})
    assert settings.get("server", "host") == "127.0.0.1"
    assert settings.get("server", "port") == 5232
    assert settings.storage_url == "sqlite:///" + str(REPO_CONFIG.parent / "var/bookdav.sqlite3")
    assert settings.get("mail", "smtp_host") == ""
    assert settings.get("mail", "maildir") == str(REPO_CONFIG.parent / "var/maildir")


def test_relative_paths_are_relative_to_the_config_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "bookdav.ini"
    config.write_text("[storage]\nurl = sqlite:///data/db.sqlite3\n[mail]\nmaildir = mail\n")
    settings = load_settings(config, environ={})
    assert settings.storage_url == f"sqlite:///{folder}/data/db.sqlite3"
    assert settings.get("mail", "maildir") == str(folder / "mail")


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    settings = load_settings(
        REPO_CONFIG,
        environ={
            "BOOKDAV_SERVER_PORT": "8080",
            "BOOKDAV_STORAGE_URL": "postgresql://u@db/bookdav",
            "BOOKDAV_MAIL_SMTP_TLS": "tls",
        },
    )
    assert settings.get("server", "port") == 8080
    assert settings.storage_url == "postgresql://u@db/bookdav"
    assert settings.get("mail", "smtp_tls") == "tls"


@pytest.mark.parametrize(
    ("content", "environ", "named"),
    [
        ("[server]\nprot = 1\n", {}, "prot"),
        ("[servr]\nport = 1\n", {}, "servr"),
        ("[server]\nport = eighty\n", {}, "[server] port"),
        ("[server]\nport = 70000\n", {}, "[server] port"),
        ("[mail]\nsmtp_tls = maybe\n", {}, "[mail] smtp_tls"),
        ("", {"BOOKDAV_SERVER_PROT": "1"}, "BOOKDAV_SERVER_PROT"),
        ("[server\nport = 1\n", {}, "config.ini"),
    ],
)
def test_bad_settings_name_the_key(
    tmp_path: Path, content: str, environ: dict[str, str], named: str
) -> None:
    config = tmp_path / "config.ini"
    config.write_text(content)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_settings(config, environ=environ)


def test_config_is_found_by_flag_then_environment_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BOOKDAV_CONFIG", raising=False)
    assert find_config_path(None) is None
    (tmp_path / "config.ini").write_text("")
    assert find_config_path(None) == Path("config.ini")
    monkeypatch.setenv("BOOKDAV_CONFIG", "/elsewhere.ini")
    assert find_config_path(None) == Path("/elsewhere.ini")
    assert find_config_path("given.ini") == Path("given.ini")


def test_configuration_docs_list_every_option() -> None:
    docs = (REPO_CONFIG.parent / "docs/configuration.md").read_text()
    assert describe_schema() in docs


@pytest.mark.parametrize(
    ("content", "allowed"),
    [
        ("", False),
        ("[server]\nallow_private_networks = true\n", True),
        ("[sync]\nallow_private_networks = true\n", True),  # the older spelling still works
    ],
)
def test_private_networks_are_allowed_by_either_spelling(
    tmp_path: Path, content: str, allowed: bool
) -> None:
    config = tmp_path / "config.ini"
    config.write_text(content, encoding="utf-8")
    assert load_settings(config, environ={}).allow_private_networks is allowed
