"""A real mosquitto for the tests (started and stopped by PID via scripts/mqtt_broker.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mqtt_broker", ROOT / "scripts" / "mqtt_broker.py")
assert _spec is not None and _spec.loader is not None
mqtt_broker = importlib.util.module_from_spec(_spec)
sys.modules["mqtt_broker"] = mqtt_broker
_spec.loader.exec_module(mqtt_broker)


def require_mosquitto() -> None:
    """`make test` and `.ci/run` install mosquitto; in CI its absence is a failure."""
    if mqtt_broker.mosquitto_available():
        return
    if os.environ.get("CI"):
        pytest.fail(mqtt_broker.INSTALL_HINT)
    pytest.skip(f"SKIPPED, NOT TESTED: {mqtt_broker.INSTALL_HINT}")
