"""An example connector-mesh adapter plugin: JSON-lines file source, JSON-file-per-key sink."""

__all__: list[str] = []
