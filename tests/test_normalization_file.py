"""A node's own normalization.json, hand-edited into JSON nested past the parser's
recursion, stops the node's restart with the named LocalError (the file, what to do), not
a RecursionError traceback (node/runtime/normalization.py load_agreed)."""

from __future__ import annotations

import pytest

from gossip.errors import LocalError
from node.runtime.normalization import NORMALIZATION_FILE, load_agreed
from node.runtime.state import StateDir


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, "{not json", ""])
def test_a_hostile_normalization_file_is_a_named_error(tmp_path, text):
    state = StateDir(tmp_path / "bank-0")
    state.path.mkdir(parents=True, exist_ok=True)
    (state.path / NORMALIZATION_FILE).write_text(text)
    with pytest.raises(LocalError, match=NORMALIZATION_FILE + ".*unreadable.*restore it"):
        load_agreed(state, schema=None)
