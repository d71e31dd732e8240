"""Radicale plugins: thin adapters from Radicale's plugin contracts onto bookdav.storage."""
