"""The consortium's [rules]: agreed, part of the id, and never contradicted by a node."""

from __future__ import annotations

import pytest

from gossip.errors import LocalError
from gossip.membership import Consortium, consortium_from_dict
from node.rules import build_strategy, resolve_rule, rules_table
from tests.helpers import consortium, keys


@pytest.mark.parametrize(("n", "rule"), [(2, "mean"), (3, "trimmed_mean"), (4, "trimmed_mean"),
                                         (5, "multi_krum"), (8, "multi_krum")])
def test_the_default_rule_is_chosen_for_the_consortium_size(n, rule):
    assert resolve_rule("auto", n) == rule
    table = rules_table(n)
    assert table == {"aggregation": rule}
    cons = consortium(keys(n))
    agreed = build_strategy(Consortium(cons.name, cons.schema, cons.members, table), None,
                            "off", 1.0)
    assert agreed.agreed and agreed.params["rule"] == rule
    assert agreed.params["f"] == (0 if rule == "mean" else 1)


def test_rules_are_part_of_the_id_and_a_file_without_them_keeps_its_old_id(tmp_path):
    base = consortium(keys(4))
    a = Consortium(base.name, base.schema, base.members, rules_table(4, "median"))
    b = Consortium(base.name, base.schema, base.members, rules_table(4, "trimmed_mean"))
    assert len({base.id, a.id, b.id}) == 3
    assert "rules" in a.digests() and "rules" not in base.digests()
    doc = a.to_toml_dict()
    again = consortium_from_dict(doc, "c.toml", tmp_path)
    assert again.id == a.id and again.rules == a.rules
    doc["rules"]["aggregation"] = "mean"  # edited after it was built
    with pytest.raises(LocalError, match="members and rules hash to"):
        consortium_from_dict(doc, "c.toml", tmp_path)


def test_a_node_that_contradicts_the_rules_is_refused():
    base = consortium(keys(4))
    cons = Consortium(base.name, base.schema, base.members,
                      rules_table(4, "median", privacy_mode="update", clip=0.1))
    with pytest.raises(LocalError, match="gossip.aggregation = 'mean' but the consortium"):
        build_strategy(cons, "mean", "update", 0.1)
    with pytest.raises(LocalError, match="privacy.mode = 'record'"):
        build_strategy(cons, None, "record", 0.1)
    with pytest.raises(LocalError, match="privacy.clip = 1"):
        build_strategy(cons, None, "update", 1.0)
    assert build_strategy(cons, "median", "update", 0.1).params["rule"] == "median"


def test_rules_a_consortium_cannot_run_are_refused_naming_the_rule():
    base = consortium(keys(4))
    too_small = Consortium(base.name, base.schema, base.members, rules_table(4, "multi_krum"))
    with pytest.raises(LocalError, match="multi_krum"):
        build_strategy(too_small, None, "off", 1.0)
    typo = Consortium(base.name, base.schema, base.members, {"aggregation": "median", "ff": 1})
    with pytest.raises(LocalError, match="rules.ff"):
        build_strategy(typo, None, "off", 1.0)
