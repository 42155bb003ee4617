"""Shared pytest set-up: the real-infrastructure fixtures live in tests/fixtures/."""

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.postgres"]
