"""Storage: the SQLAlchemy schema, the database layer, calendar storage and its time index."""
