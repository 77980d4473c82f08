"""The consortium's [rules]: agreed, part of the id, and never contradicted by a node."""

from __future__ import annotations

import pytest

from gossip.errors import LocalError
from gossip.membership import Consortium, consortium_from_dict
from node.strategy.consortium_rules import build_strategy, pin_rules, resolve_rule, rules_table
from tests.helpers import consortium, keys


@pytest.mark.parametrize(("n", "rule"), [(2, "mean"), (3, "trimmed_mean"), (4, "trimmed_mean"),
                                         (5, "multi_krum_staged"), (8, "multi_krum_staged")])
def test_the_default_rule_is_chosen_for_the_consortium_size(n, rule):
    assert resolve_rule("auto", n) == rule
    table = rules_table(n)
    # The default recipe: FedAdam (server_lr 0.03) behind the robust rule; none for two.
    recipe = {"server_opt": "adam", "server_lr": 0.03} if rule != "mean" else {}
    # ... and the digest echo, on in every file flnode writes (issue 19)
    assert table == {"aggregation": rule, "echo": True,
                     **({"params": recipe} if recipe else {})}
    cons = consortium(keys(n))
    agreed = build_strategy(Consortium(cons.name, cons.schema, cons.members, table), None,
                            "off", 1.0)
    assert agreed.agreed and agreed.params["rule"] == rule
    # f: a quarter of the members, at least 1 (2 at eight)
    assert agreed.params["f"] == (0 if rule == "mean" else max(1, n // 4))
    assert agreed.strategy.params["server_opt"] == recipe.get("server_opt", "none")
    # Asked for by name, a rule comes without the recipe's optimizer; asked for with
    # one, the caller's choice stands.
    assert "params" not in rules_table(n, rule)
    assert rules_table(n, server_opt="none")["params"] == {"server_opt": "none"}


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("table", [{"aggregation": "auto"}, {"f": 1}])
def test_auto_in_a_hand_written_rules_table_gets_the_default_recipe_and_says_so(n, table, caplog):
    """A [rules] table that leaves the rule to "auto" (by name or by leaving the key out)
    gets what `flnode consortium build` writes: the same rule and server optimizer."""
    cons = consortium(keys(n))
    if n == 2 and "f" in table:
        table = {"f": 0}
    with caplog.at_level("WARNING", logger="flnode.node"):
        agreed = build_strategy(Consortium(cons.name, cons.schema, cons.members, table), None,
                                "off", 1.0)
    built = build_strategy(Consortium(cons.name, cons.schema, cons.members,
                                      pin_rules(rules_table(n), n, "test")), None, "off", 1.0)
    assert agreed.strategy.name == built.strategy.name == resolve_rule("auto", n)
    assert agreed.strategy.params == built.strategy.params
    want = "none" if n == 2 else "adam"
    assert agreed.strategy.params["server_opt"] == want
    if n > 2:  # left to this version's defaults: the node says which, with the values
        assert "server_opt = 'adam'" in caplog.text and "server_lr = 0.03" in caplog.text
    # a server optimizer the table names stands, auto or not
    own = build_strategy(Consortium(cons.name, cons.schema, cons.members,
                                    {**table, "params": {"server_opt": "none"}}), None, "off", 1.0)
    assert own.strategy.params["server_opt"] == "none"


@pytest.mark.parametrize("n", [3, 8])
def test_the_default_recipe_without_dp_uses_a_shorter_server_momentum(n):
    """FedAdam's beta1 is 0.5 where the consortium pins privacy_mode = "off" and 0.9
    (the optimizer's default) under any DP mode or where the mode is not pinned."""
    cons = consortium(keys(n))

    def beta1(table: dict) -> float:
        agreed = build_strategy(Consortium(cons.name, cons.schema, cons.members, table), None,
                                table.get("privacy_mode") or "off", 1.0)
        assert agreed.strategy.params["server_opt"] == "adam"
        return agreed.strategy.params["server_momentum"]

    assert rules_table(n, privacy_mode="off")["params"]["server_momentum"] == 0.5
    assert beta1(pin_rules(rules_table(n, privacy_mode="off"), n, "t")) == 0.5
    for mode in (None, "record", "update"):
        table = rules_table(n, privacy_mode=mode, clip=1.0 if mode else None)
        assert "server_momentum" not in table["params"]
        assert beta1(pin_rules(table, n, "t")) == 0.9
    # hand-written: auto with the mode pinned gets the same; a beta1 it names stands
    assert beta1({"privacy_mode": "off"}) == 0.5
    assert beta1({"privacy_mode": "record", "clip": 1.0}) == 0.9
    assert beta1({"privacy_mode": "off", "params": {"server_opt": "adam",
                                                    "server_momentum": 0.8}}) == 0.8
    # a rule asked for by name gets no recipe at all
    assert "params" not in rules_table(n, resolve_rule("auto", n), privacy_mode="off")


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
    with pytest.raises(LocalError, match="addresses and rules hash to"):
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


def test_an_agreed_noise_bound_turns_on_the_dp_distance_bound_for_every_rule():
    import torch

    from node.strategy import WeightedShare
    from node.strategy.distance import dp_bound

    base = consortium(keys(4))
    cons = Consortium(base.name, base.schema, base.members,
                      rules_table(4, "trimmed_mean", privacy_mode="update", clip=0.1,
                                  noise_multiplier=1.0))
    agreed = build_strategy(cons, None, "update", 0.1, noise_multiplier=0.8)
    assert agreed.params["dp_clip"] == 0.1 and agreed.params["dp_noise_multiplier"] == 1.0
    assert agreed.params["distance"] == "clip"
    with pytest.raises(LocalError, match="noise multiplier 1.5 is above"):
        build_strategy(cons, None, "update", 0.1, noise_multiplier=1.5)
    # A member-signed share scaled far away is clipped back onto the bound; honest ones
    # (start + clipped update + the agreed noise) are not touched.
    d, gen = 200, torch.Generator().manual_seed(0)
    start = torch.zeros(d)
    honest = {f"bank-{i}": WeightedShare(f"bank-{i}", 100.0, start + 0.1 * torch.randn(
        d, generator=gen)) for i in range(3)}
    hostile = WeightedShare("bank-3", 100.0, start + 1000.0)
    out = agreed.strategy.aggregate(0, honest["bank-0"], {**honest, "bank-3": hostile},
                                    reference=start)
    # (or, far beyond the others, left out before the bound)
    assert set(out.clipped) | {m for m, x in out.excluded.items()
                               if x.reason == "far_outlier"} == {"bank-3"}
    assert out.bound.source == "dp" and out.bound.value == pytest.approx(dp_bound(0.1, 1.0, d,
                                                                                   1e-9))


def test_a_noise_bound_without_update_dp_and_clip_is_refused():
    base = consortium(keys(4))
    for table in (rules_table(4, "median", noise_multiplier=1.0),
                  rules_table(4, "median", privacy_mode="update", noise_multiplier=1.0)):
        cons = Consortium(base.name, base.schema, base.members, table)
        with pytest.raises(LocalError, match="noise_multiplier bounds update-level DP"):
            build_strategy(cons, None, "update", 0.1)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_a_built_file_pins_every_parameter_so_a_changed_default_cannot_split_members(n, caplog):
    """What `flnode consortium build` writes fixes every parameter of the rule: a later
    flnode version with other defaults applies the very same strategy."""
    import node.strategy.base as base_mod
    from node.strategy.rules import RULE_CLASSES

    cons = consortium(keys(n))
    pinned = Consortium(cons.name, cons.schema, cons.members, pin_rules(rules_table(n), n))
    with caplog.at_level("WARNING", logger="flnode.node"):
        before = build_strategy(pinned, None, "off", 1.0).strategy.params
    assert "defaults" not in caplog.text
    # Another version: every default changed.
    changed = {"weighting": "declared" if before["weighting"] == "equal" else "equal",
               "distance": "reject", "distance_factor": 9.0, "outlier_factor": 7.0,
               "far_factor": 50.0}
    saved = dict(base_mod.COMMON_PARAMS), {c: (dict(c.DEFAULTS), dict(c.PARAMS))
                                           for c in RULE_CLASSES}
    try:
        base_mod.COMMON_PARAMS.update({k: v for k, v in changed.items()
                                       if k in base_mod.COMMON_PARAMS})
        for c in RULE_CLASSES:
            c.DEFAULTS = {k: changed.get(k, v) for k, v in c.DEFAULTS.items()}
            c.PARAMS = {k: changed.get(k, v) for k, v in c.PARAMS.items()}
        after = build_strategy(pinned, None, "off", 1.0).strategy.params
        bare = build_strategy(Consortium(cons.name, cons.schema, cons.members, rules_table(n)),
                              None, "off", 1.0).strategy.params
    finally:
        base_mod.COMMON_PARAMS.clear()
        base_mod.COMMON_PARAMS.update(saved[0])
        for c, (d, p) in saved[1].items():
            c.DEFAULTS, c.PARAMS = d, p
    assert after == before
    assert bare != before  # an unpinned file follows the code's defaults ...
    assert "[rules] leaves" in caplog.text and "distance = 'reject'" in caplog.text  # ... said


def test_pinning_keeps_the_dp_bound_and_refuses_what_the_consortium_cannot_run():
    table = pin_rules(rules_table(4, "trimmed_mean", privacy_mode="update", clip=0.1,
                                  noise_multiplier=1.0), 4)
    assert table["params"]["distance"] == "clip" and table["noise_multiplier"] == 1.0
    assert "dp_clip" not in table["params"]  # derived from clip, not a second copy
    cons = consortium(keys(4))
    agreed = build_strategy(Consortium(cons.name, cons.schema, cons.members, table), None,
                            "update", 0.1)
    assert agreed.params["dp_clip"] == 0.1 and agreed.params["distance"] == "clip"
    with pytest.raises(LocalError, match="multi_krum"):
        pin_rules(rules_table(4, "multi_krum"), 4)
    with pytest.raises(LocalError, match="rules.ff"):
        pin_rules({"aggregation": "median", "ff": 1}, 4)
