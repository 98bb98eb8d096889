"""Fake external systems for tests: real servers that misbehave on request (``crm_api``)."""
