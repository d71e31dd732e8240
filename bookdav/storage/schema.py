"""The one SQLAlchemy `MetaData`: every table bookdav stores, declared once.

Instants are integer seconds since the epoch, UTC (fast, indexable, the same on SQLite and
PostgreSQL); the IANA zone a time was given in is stored beside it where it matters.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("email", String(320), nullable=False),
    Column("name", String(200), nullable=False, server_default=""),
    Column("role", String(16), nullable=False),
    Column("timezone", String(64), nullable=False, server_default="UTC"),
    Column("password_hash", Text, nullable=False),
    Column("status", String(16), nullable=False, server_default="active"),
    Column("created_at", BigInteger, nullable=False),
    # Per-user settings as JSON (e.g. which notifications a provider wants by email).
    Column("preferences", Text, nullable=False, server_default="{}"),
)

# Calendar storage (Radicale's collections and items). A collection's `revision` rises on every
# change; `item_changes` keeps the revision at which each href last changed (deletions included),
# which is what RFC 6578 sync-collection reports.
collections = Table(
    "collections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", String(1024), nullable=False, unique=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("parent_path", String(1024), nullable=False, index=True),
    Column("tag", String(16), nullable=False, server_default=""),
    Column("props", Text, nullable=False, server_default="{}"),
    Column("timezone", String(64), nullable=False, server_default="UTC"),
    Column("revision", BigInteger, nullable=False, server_default="0"),
    # A new incarnation (random) each time a path is created, so an old sync token of a deleted and
    # re-created collection is rejected instead of silently matching.
    Column("incarnation", String(32), nullable=False),
    Column("modified_at", BigInteger, nullable=False),
    # The longest "long" occurrence ever indexed here (seconds; only grows): bounds how far before a
    # query's start a long occurrence may begin, so range scans stay O(result).
    Column("longest_occurrence_seconds", BigInteger, nullable=False, server_default="0"),
)

items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "collection_id",
        Integer,
        ForeignKey("collections.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("href", String(1024), nullable=False),
    Column("uid", String(1024), nullable=False),
    Column("etag", String(80), nullable=False),
    Column("component", String(16), nullable=False),
    Column("text", Text, nullable=False),
    # The item's whole time range (Radicale's `item.time_range`); end is far future for open RRULEs.
    Column("start_utc", BigInteger, nullable=False),
    Column("end_utc", BigInteger, nullable=False),
    Column("recurring", Boolean, nullable=False, server_default="0"),
    # For recurring items: occurrences are indexed up to here (seconds UTC); beyond it, ask the item.
    Column("indexed_until", BigInteger, nullable=True),
    Column("modified_at", BigInteger, nullable=False),
    UniqueConstraint("collection_id", "href", name="uq_items_collection_href"),
)
Index("ix_items_collection_uid", items.c.collection_id, items.c.uid)
Index("ix_items_collection_range", items.c.collection_id, items.c.start_utc, items.c.end_utc)
# Finds the items whose occurrences are not all indexed before a query's end (open RRULEs).
Index("ix_items_collection_indexed_until", items.c.collection_id, items.c.indexed_until)

item_changes = Table(
    "item_changes",
    metadata,
    Column(
        "collection_id",
        Integer,
        ForeignKey("collections.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("href", String(1024), primary_key=True),
    Column("revision", BigInteger, nullable=False),
)
Index("ix_item_changes_revision", item_changes.c.collection_id, item_changes.c.revision)

# One row per occurrence interval of every VEVENT: the time-range index that calendar queries,
# free-busy and the slot engine read. `busy` is false for TRANSP:TRANSPARENT, STATUS:CANCELLED and
# zero-length occurrences, which never block time. `long_span` marks occurrences longer than
# `calendars.SHORT_OCCURRENCE_SECONDS`: short ones are found with `start >= qstart - that bound`,
# long ones (few) with the collection's `longest_occurrence_seconds`, so both scans are bounded.
occurrences = Table(
    "occurrences",
    metadata,
    Column("item_id", Integer, ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
    Column("collection_id", Integer, nullable=False),
    Column("start_utc", BigInteger, nullable=False),
    Column("end_utc", BigInteger, nullable=False),
    Column("busy", Boolean, nullable=False, server_default="1"),
    Column("long_span", Boolean, nullable=False, server_default="0"),
)
Index(
    "ix_occurrences_range",
    occurrences.c.collection_id,
    occurrences.c.long_span,
    occurrences.c.start_utc,
)
Index("ix_occurrences_item", occurrences.c.item_id)

# API bearer tokens: only a SHA-256 of the secret is kept (the secret is 256 random bits, so a
# slow hash buys nothing); revoked tokens stay for the record.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False, server_default=""),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)
Index("ix_api_tokens_user", api_tokens.c.user_id)

# Services a client can book. Deleting one hides it (deleted_at) so past appointments keep it.
services = Table(
    "services",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("slug", String(80), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("duration_minutes", Integer, nullable=False),
    Column("price_amount", String(32), nullable=False, server_default="0"),
    Column("price_currency", String(3), nullable=False, server_default="EUR"),
    # Business rules as JSON (camelCase keys of the API): notice, advance, buffers, interval, ...
    Column("rules", Text, nullable=False, server_default="{}"),
    # Per-service overrides of the notification templates (name -> jinja2 source) and reminder
    # offsets, as JSON.
    Column("templates", Text, nullable=False, server_default="{}"),
    Column("created_by", String(36), ForeignKey("users.id"), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("deleted_at", BigInteger, nullable=True),
)

service_providers = Table(
    "service_providers",
    metadata,
    Column(
        "service_id", String(36), ForeignKey("services.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("provider_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)
Index("ix_service_providers_provider", service_providers.c.provider_id)

# Rooms, chairs, devices: each has its own calendar under /dav/resources/<slug>/, so it can be
# booked, blocked by hand in any calendar app, and locked like a provider.
resources = Table(
    "resources",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("slug", String(80), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

service_resources = Table(
    "service_resources",
    metadata,
    Column(
        "service_id", String(36), ForeignKey("services.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("resource_id", String(36), ForeignKey("resources.id"), primary_key=True),
)

# An appointment is also a VEVENT in the provider's Appointments calendar (event_href); this row is
# what the API lists and what notifications and reminders refer to. Status: confirmed, cancelled,
# completed, no_show.
appointments = Table(
    "appointments",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("service_id", String(36), ForeignKey("services.id"), nullable=False),
    Column("provider_id", String(36), ForeignKey("users.id"), nullable=False),
    Column("client_id", String(36), ForeignKey("users.id"), nullable=True),
    Column("client_name", String(200), nullable=False),
    Column("client_email", String(320), nullable=False),
    Column("client_timezone", String(64), nullable=False),
    Column("start_utc", BigInteger, nullable=False),
    Column("end_utc", BigInteger, nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("recurrence", Text, nullable=True),
    Column("status", String(16), nullable=False),
    Column("notes", Text, nullable=False, server_default=""),
    Column("event_uid", String(200), nullable=False),
    Column("event_href", String(300), nullable=False),
    Column("sequence", Integer, nullable=False, server_default="0"),
    Column("confirmation_code", String(16), nullable=False, unique=True),
    Column("manage_token", String(64), nullable=False, unique=True),
    Column("cancellation_reason", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    # Recurring appointments: cancelled and moved occurrences, as JSON.
    Column("exceptions", Text, nullable=False, server_default="{}"),
    # The client's answer to the invitation (iMIP REPLY): NEEDS-ACTION, ACCEPTED, DECLINED, ...
    Column("client_partstat", String(16), nullable=False, server_default="NEEDS-ACTION"),
)
Index("ix_appointments_provider_start", appointments.c.provider_id, appointments.c.start_utc)
Index("ix_appointments_client", appointments.c.client_id)

# Idempotency-Key: the first answer to a (who, key) pair, replayed for retries of that request.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("scope", String(400), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("response", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# The transactional outbox: rows written in the same transaction as the change they announce,
# delivered later (with retries) by a worker, so nothing is lost when mail or a remote is down.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(40), nullable=False),
    Column("appointment_id", String(36), nullable=True),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    # A row that must exist at most once (a reminder per occurrence, offset and sequence): a second
    # insert with the same key is skipped, so planning twice (or in two processes) sends once.
    Column("dedupe_key", String(200), nullable=True),
)
Index("ix_outbox_due", outbox.c.status, outbox.c.next_attempt_at)
Index("ux_outbox_dedupe_key", outbox.c.dedupe_key, unique=True)

# Webhooks: each delivery is an outbox row (kind "webhook"), signed with the hook's secret.
webhooks = Table(
    "webhooks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("owner_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    Column("events", Text, nullable=False),  # JSON list of event names
    Column("secret", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("deleted_at", BigInteger, nullable=True),
)
Index("ix_webhooks_owner", webhooks.c.owner_id)

# External calendars of a provider: "busy" sources mirrored into a read-only collection under
# /dav/<username>/ (collection_path), "destination" calendars that receive every booking through
# the outbox. Credentials are encrypted with [sync] secret_key; `state` holds sync tokens/ETags.
external_calendars = Table(
    "external_calendars",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("provider_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("type", String(16), nullable=False),
    Column("url", Text, nullable=False),
    Column("role", String(16), nullable=False),
    Column("credentials", Text, nullable=True),
    Column("show_titles", Boolean, nullable=False, server_default="0"),
    Column("collection_path", String(1024), nullable=True),
    Column("state", Text, nullable=False, server_default="{}"),
    Column("last_success_at", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("failures", Integer, nullable=False, server_default="0"),
    Column("next_run_at", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)
Index("ix_external_calendars_provider", external_calendars.c.provider_id)
Index("ix_external_calendars_due", external_calendars.c.next_run_at)

# What a busy source's last pull saw: remote href -> ETag and the mirrored item's local href, so a
# cycle fetches only what changed and deletes what disappeared.
external_items = Table(
    "external_items",
    metadata,
    Column(
        "calendar_id",
        String(36),
        ForeignKey("external_calendars.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("remote_href", String(1024), primary_key=True),
    Column("etag", String(200), nullable=False, server_default=""),
    Column("local_href", String(300), nullable=False),
)

# Dashboard logins (/app/): the cookie carries a random token; only its SHA-256 is stored.
web_sessions = Table(
    "web_sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("csrf_secret", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
)
Index("ix_web_sessions_user", web_sessions.c.user_id)
