"""`flnode consortium build --secure`: what a new operator of docs/operate/secure.md met. A
build every node then refuses is refused at build (federated normalization with DP on the
sum), the refusal of too few members gives advice that can be followed, and no warning
about an aggregation rule secure rounds do not use."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from node.cli import main
from tests.helpers import SCHEMA

DP = ["--privacy-mode", "record", "--clip", "1.0", "--secure-rows", "2560",
      "--secure-epsilon", "3", "--secure-delta", "1e-5"]

RANGED = [SCHEMA["columns"][0], {"name": "balance", "kind": "numeric", "range": [0.0, 3000.0]},
          {"name": "income", "kind": "numeric", "range": [0.0, 80000.0]}]


def build_argv(tmp_path: Path, n: int, schema: dict) -> list[str]:
    names = [f"bank-{c}" for c in "abcde"[:n]]
    for name in names:
        if not (tmp_path / "keys" / f"{name}.pub").exists():
            assert main(["keygen", "--out", str(tmp_path / "keys"), "--name", name]) == 0
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(schema))
    return ["consortium", "build", "--name", "banks", "--schema", str(tmp_path / "schema.toml"),
            *[a for m in names for a in ("--member", str(tmp_path / "keys" / f"{m}.pub"))],
            "--secure", "--out", str(tmp_path / "c.toml")]


def test_federated_normalization_with_dp_on_the_secure_sum_is_refused_at_build(tmp_path,
                                                                               capsys):
    argv = build_argv(tmp_path, 4, {**SCHEMA, "normalize": "federated", "columns": RANGED})
    capsys.readouterr()
    assert main([*argv, *DP]) == 2
    err = capsys.readouterr().err
    assert 'normalize = "federated"' in err and 'normalize = "range"' in err
    assert '"declared"' in err and not (tmp_path / "c.toml").exists()
    # without DP on the sum the exchange is the plain one: built as before
    assert main(argv) == 0
    # with a range schema the DP build goes through
    argv = build_argv(tmp_path, 4, {**SCHEMA, "normalize": "range", "columns": RANGED})
    assert main([*argv, "--force", *DP]) == 0


def test_three_members_are_told_to_add_one_not_to_lower_a_threshold_already_at_1(
        tmp_path, capsys):
    argv = build_argv(tmp_path, 3, SCHEMA)
    capsys.readouterr()
    assert main([*argv, *DP]) == 2
    err = capsys.readouterr().err
    assert "n >= 3t + 1 = 4" in err and "lower the threshold" not in err
    assert "at least 4 for t = 1, the smallest threshold" in err


def test_a_threshold_too_high_names_the_largest_the_members_allow(tmp_path, capsys):
    argv = build_argv(tmp_path, 5, SCHEMA)
    capsys.readouterr()
    assert main([*argv, "--secure-threshold", "2"]) == 2
    assert "lower the threshold to 1 (the largest 5 members allow)" in capsys.readouterr().err


@pytest.mark.parametrize("secure", [True, False])
def test_no_trimmed_mean_warning_in_secure_mode(tmp_path, capsys, secure):
    argv = build_argv(tmp_path, 4, SCHEMA)
    if not secure:
        argv.remove("--secure")
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("trimmed_mean" in err) is (not secure), err


def test_the_f_default_the_help_states_is_the_one_built(tmp_path, capsys):
    """`consortium build --help` said `--f ... (default 1 ...)`: wrong from 8 members up."""
    from gossip.membership import load_consortium
    from node.strategy.consortium_rules import default_f

    with pytest.raises(SystemExit):
        main(["consortium", "build", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "(default max(1, n // 4): 1 up to 7 members, 2 from 8;" in helptext
    assert [default_f(n) for n in (3, 7, 8)] == [1, 1, 2]
    names = [f"m-{i}" for i in range(8)]
    for name in names:
        assert main(["keygen", "--out", str(tmp_path / "keys"), "--name", name]) == 0
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(SCHEMA))
    assert main(["consortium", "build", "--name", "c", "--schema", str(tmp_path / "schema.toml"),
                 *[a for m in names for a in ("--member", str(tmp_path / "keys" / f"{m}.pub"))],
                 "--out", str(tmp_path / "c.toml")]) == 0
    assert load_consortium(tmp_path / "c.toml").rules["f"] == 2
