"""Notifications: iMIP invitations over SMTP or into a Maildir, delivered from the outbox."""
