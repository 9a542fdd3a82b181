"""Every experiment test trains tiny models: one intra-op thread each (tests.fixtures.one_thread)."""

from tests.fixtures import one_thread  # noqa: F401  (autouse fixture)
