"""SQL database adapters. Import the module of the database you need (``adapters.sql.sqlite``)."""

__all__: list[str] = []
