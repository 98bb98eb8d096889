"""Contract suites: one set of tests for every Source and one for every Sink.

Each adapter gets a *driver* (``_source_drivers.py``, ``_sink_drivers.py``; plugin distributions
ship theirs under the ``mesh.contract_drivers`` entry point group, collected by ``_drivers.py``)
that creates the real system, changes it, reads it back and makes it go away; the tests
(``test_sources.py``, ``test_sinks.py``) are written once against the drivers and generated for
every driver that declares the capabilities a test needs (``_base.py``). ``test_matrix.py`` pins
the matrix and fails when an installed adapter has no driver.
"""
