"""SQLAlchemy 2 models, sessions and the queries the other parts share."""
