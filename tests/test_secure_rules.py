"""The consortium's secure mode (issue 22): [rules] secure / secure_threshold /
secure_select, pinned like every rule and checked against the member count."""

from __future__ import annotations

import pytest

from gossip.errors import LocalError
from gossip.membership import Consortium
from node.strategy.consortium_rules import (
    SecureRule,
    pin_rules,
    rules_table,
    secure_rule,
)
from tests.helpers import consortium, keys


def _with(n: int, table: dict) -> Consortium:
    cons = consortium(keys(n))
    return Consortium(cons.name, cons.schema, cons.members, table)


def test_no_secure_key_is_the_plain_mode_and_keeps_the_id():
    table = rules_table(8)
    assert "secure" not in table and "secure_threshold" not in table
    plain = _with(8, pin_rules(table, 8))
    assert secure_rule(plain) is None
    # the same table written with secure=False is byte for byte the same consortium
    assert _with(8, pin_rules(rules_table(8, secure=False), 8)).id == plain.id


def test_secure_is_pinned_with_its_threshold_and_selection():
    table = pin_rules(rules_table(8, secure=True), 8)
    assert (table["secure"], table["secure_threshold"], table["secure_select"]) == \
        (True, 2, "multi-krum")  # the largest t with 8 >= 3t + 1
    cons = _with(8, table)
    assert secure_rule(cons) == SecureRule(2, "multi-krum")
    assert secure_rule(cons).variant == "distances"
    assert cons.id != _with(8, pin_rules(rules_table(8), 8)).id
    # a threshold left out of a hand-written table is resolved the same way and written out
    hand = pin_rules({"aggregation": "auto", "secure": True, "secure_select": "norm"}, 7)
    assert hand["secure_threshold"] == 2 and secure_rule(_with(7, hand)).variant == "norm_only"


@pytest.mark.parametrize(("n", "table", "words"), [
    (6, {"secure": True, "secure_threshold": 2}, "n >= 3t + 1 = 7"),
    (4, {"secure": True, "secure_threshold": 1, "secure_select": "multi-krum"},
     "2f + 3 = 5 members"),  # multi-Krum at t = 1, asked for by name
    (8, {"secure_threshold": 2}, "rules.secure is not true"),
    (8, {"secure": False, "secure_select": "norm"}, "rules.secure_select is set"),
    (8, {"secure": True, "secure_select": "krum"}, "rules.secure_select"),
    (8, {"secure": True, "secure_threshold": 0}, "rules.secure_threshold"),
    (8, {"secure": "yes"}, "rules.secure"),
])
def test_a_secure_mode_that_cannot_run_is_refused_naming_the_key(n, table, words):
    with pytest.raises(LocalError, match="rules") as exc:
        secure_rule(_with(n, table))
    assert words in str(exc.value)
    with pytest.raises(LocalError):  # and `flnode consortium build` refuses to write it
        pin_rules(table, n)


def test_small_consortia_get_the_norm_bound_by_default():
    """4 members: t = 1, and multi-Krum at f = 1 needs 5: the norm bound is written."""
    table = pin_rules(rules_table(4, secure=True), 4)
    assert (table["secure_threshold"], table["secure_select"]) == (1, "norm")
    assert pin_rules(rules_table(5, secure=True), 5)["secure_select"] == "multi-krum"


def test_norm_selection_runs_where_multi_krum_cannot():
    assert secure_rule(_with(4, {"secure": True, "secure_threshold": 1,
                                 "secure_select": "norm"})) == SecureRule(1, "norm")


def test_consortium_build_and_scenarios_write_the_secure_rule(tmp_path, capsys):
    """`flnode consortium build --secure` pins t and the selection (and refuses a threshold
    the members cannot run, naming it); a scenario's `secure` keys reach the spec."""
    import tomli_w

    from gossip.membership import load_consortium
    from node.cli import main
    from node.rehearsal.simulation.scenario import build_spec
    from tests.helpers import SCHEMA

    names = [f"bank-{i}" for i in range(5)]
    for name in names:
        assert main(["keygen", "--out", str(tmp_path / "keys"), "--name", name]) == 0
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(SCHEMA))
    argv = ["consortium", "build", "--name", "c", "--schema", str(tmp_path / "schema.toml"),
            *[a for n in names for a in ("--member", str(tmp_path / "keys" / f"{n}.pub"))]]
    assert main([*argv, "--out", str(tmp_path / "plain.toml")]) == 0
    assert main([*argv, "--out", str(tmp_path / "secure.toml"), "--secure"]) == 0
    plain, sec = load_consortium(tmp_path / "plain.toml"), load_consortium(tmp_path / "secure.toml")
    assert secure_rule(plain) is None and "secure" not in plain.rules
    assert secure_rule(sec) == SecureRule(1, "multi-krum")
    assert main([*argv, "--out", str(tmp_path / "bad.toml"), "--secure",
                 "--secure-threshold", "2"]) == 2
    assert "secure_threshold = 2" in capsys.readouterr().err
    sc = tmp_path / "s.toml"
    sc.write_text('dataset = "digits"\nsecure = true\nsecure_select = "norm"\n')
    spec = build_spec(sc, {"out": tmp_path / "o"})
    assert (spec.secure, spec.secure_select, spec.secure_threshold) == (True, "norm", None)
