"""Rehearsal outside the production path: `flnode run` refuses a config with [attack] or
[faults] and names the entry point that rehearses; that entry point reads them; the
runtime never imports the rehearsal package."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gossip.errors import LocalError
from node.rehearsal.config import load_rehearsal_config
from node.runtime.config import load_config
from tests.mqtt_support import ROOT
from tests.test_config import GOOD, write

SECTIONS = {"attack": '\n[attack]\nkind = "sign-flip"\nparam = 4.0\n',
            "faults": "\n[faults]\nloss = 0.2\nstraggle = 2.0\n"}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_a_node_config_refuses_a_rehearsal_section_and_says_where_to_rehearse(tmp_path,
                                                                              section):
    path = write(tmp_path, GOOD + SECTIONS[section])
    with pytest.raises(LocalError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and f"[{section}] is a rehearsal section" in text
    assert "python -m node.rehearsal.member" in text and "flnode simulate" in text
    cfg = load_rehearsal_config(path)  # the rehearsal's own loader reads it
    assert getattr(cfg, section) is not None
    assert cfg.training.lr == 0.1 and cfg.identity.key == tmp_path / "k.key"


def test_a_typo_in_a_rehearsal_section_is_still_named(tmp_path):
    path = write(tmp_path, GOOD + '\n[attack]\nkind = "sign-flip"\nparma = 4.0\n')
    with pytest.raises(LocalError, match=r"attack\.parma: unknown key"):
        load_rehearsal_config(path)


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_flnode_run_refuses_attack_and_faults_through_the_real_cli(tmp_path):
    """The real `flnode run` (python -m node.cli run): exit 2 before anything is read,
    trained or sent, naming the section and the rehearsal entry points; the rehearsal
    entry point gets past the config (and stops at the next thing missing: the key)."""
    for section, text in SECTIONS.items():
        path = write(tmp_path, GOOD + text)
        run = _run("-m", "node.cli", "run", "--config", str(path))
        assert run.returncode == 2, run.stderr
        assert f"[{section}] is a rehearsal section" in run.stderr
        assert "python -m node.rehearsal.member --config FILE" in run.stderr
        member = _run("-m", "node.rehearsal.member", "--config", str(path))
        assert member.returncode == 2, member.stderr
        assert "rehearsal section" not in member.stderr and "k.key" in member.stderr


def test_the_runtime_never_imports_the_rehearsal_package():
    code = ("import sys, node.runtime.node, node.runtime.daemon, node.runtime.config, node.cli; "
            "bad = sorted(m for m in sys.modules if m.startswith('node.rehearsal')); "
            "assert not bad, bad")
    run = _run("-c", code)
    assert run.returncode == 0, run.stderr
