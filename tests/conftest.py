"""Test tiers. `make test-unit` runs the `unit` tier: the pure modules (envelope,
seal, wire parsing, rounds, aggregation strategies, privacy accounting,
membership, config, identity, the golden contracts of tests/golden/), no broker,
no network, no training; it runs in well under a minute. `make test` runs everything."""

from __future__ import annotations

import logging

import pytest

UNIT_MODULES = frozenset({
    "test_envelope", "test_seal", "test_parse_bounds", "test_rounds", "test_aggregate",
    "test_strategy", "test_privacy", "test_membership", "test_config", "test_identity",
    "test_fuzz", "test_rules", "test_golden", "test_docs",
    "test_protocol_machine", "test_protocol_parts", "test_protocol_echo", "test_layout",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _flnode_log_level():
    """A test that runs a bench's main() in-process (tests/test_skew.py) leaves the
    "flnode" logger at CRITICAL, as the bench sets it for its own output; a later test
    that reads caplog would then see nothing. Every test starts from the level before."""
    logger = logging.getLogger("flnode")
    level = logger.level
    yield
    logger.setLevel(level)
