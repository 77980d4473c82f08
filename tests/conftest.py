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


def pytest_configure(config: pytest.Config) -> None:
    if _loadgroup(config):
        config.pluginmanager.register(_LoadGroup(), "flnode-loadgroup")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marks set here are in place before xdist's own collection hook reads them."""
    if _loadgroup(item.config):
        _group_shared_fixtures(item)


def _loadgroup(config: pytest.Config) -> bool:
    """`make test`'s `-n 3 --dist loadgroup`; on an xdist worker (where collection
    happens) it reads as this option."""
    return bool(getattr(config.option, "loadgroup", False))


# How `make test` (`-n 3 --dist loadgroup`; any -n alike) hands out tests: one by one, in collection
# order. Two changes, neither alters what a test runs or checks:
# - Tests of one module that share a module-scoped fixture (a whole simulated run, a
#   prepared consortium, a started broker) form one xdist group: they run on one worker
#   and the fixture is set up once instead of once on each worker.
# - The `slow` tests (real processes, whole runs: 10-60 s each) are handed out first and
#   the quick ones fill in after, so the run does not end on one worker finishing a long
#   test started last while the others sit idle (longest first).
class _LoadGroup:
    @pytest.hookimpl(trylast=True)  # after xdist's hook, which names each item's group
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            _keep_xdist_group(item)
        items.sort(key=lambda it: it.get_closest_marker("slow") is None)  # stable: slow first


def _keep_xdist_group(item: pytest.Item) -> None:
    """pytest-xdist 3.8 names an item's xdist_group by appending "@GROUP" to
    `item._nodeid`, which pytest 9 no longer reads (the id is `item._id`): every group
    was silently split across the workers (the Ray module's too). Carry it over."""
    named = getattr(item, "_nodeid", None)
    if isinstance(named, str) and named != item.nodeid and hasattr(item, "_id"):
        from _pytest.nodeid import NodeId  # lean start: pytest 9's id class, only here

        item._id = NodeId.parse(named)


def _group_shared_fixtures(item: pytest.Item) -> None:
    info = getattr(item, "_fixtureinfo", None)
    if info is None or item.get_closest_marker("xdist_group") is not None:
        return
    shared = sorted(name for name, defs in info.name2fixturedefs.items()
                    if defs and defs[-1].scope == "module")
    if shared:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        item.add_marker(pytest.mark.xdist_group(f"{module}:{'+'.join(shared)}"))


@pytest.fixture(autouse=True)
def _flnode_log_level():
    """A test that runs a bench's main() in-process (tests/test_skew.py) leaves the
    "flnode" logger at CRITICAL, as the bench sets it for its own output; a later test
    that reads caplog would then see nothing. Every test starts from the level before."""
    logger = logging.getLogger("flnode")
    level = logger.level
    yield
    logger.setLevel(level)
