"""CSV files for batch flows. Import the module you need: ``adapters.files.csv_source``
(:class:`~adapters.files.csv_source.CsvSource`, import) or ``adapters.files.csv_sink``
(:class:`~adapters.files.csv_sink.CsvSink`, export); ``adapters.files.runs`` reads their run
records. The private modules hold the parts: ``_csvio`` (records with byte offsets, typed cells,
checksums, durable writes) and ``_state`` (the adapters' SQLite state file).
"""

__all__: list[str] = []
