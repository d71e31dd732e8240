"""HTTP: the aiohttp app factory, the Radicale mount, the JSON API and the pages."""
