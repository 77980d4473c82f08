"""gossip/topology.py: each topology's peer sets are what its name says, every member
computes everyone's identically, and the union over rounds connects the consortium."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.errors import LocalError
from gossip.topology import build_topology, parse_topology


def keys(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


SEED = bytes(range(32))


def edges(topo, r):
    return {(m, p) for m in topo.members for p in topo.out_peers(m, r)}


def check_in_is_reverse_of_out(topo, r):
    """Whom m waits for in round r is exactly who sends to m in round r."""
    sent_to = {m: set() for m in topo.members}
    for m in topo.members:
        for p in topo.out_peers(m, r):
            assert p != m
            sent_to[p].add(m)
    for m in topo.members:
        assert set(topo.in_peers(m, r)) == sent_to[m]


def _reached(adj, start) -> set:
    """Every member reachable from `start` along `adj` (member -> neighbours)."""
    seen, todo = {start}, [start]
    while todo:
        for nb in adj[todo.pop()]:
            if nb not in seen:
                seen.add(nb)
                todo.append(nb)
    return seen


def connected(members, pairs) -> bool:
    adj = {m: set() for m in members}
    for a, b in pairs:
        adj[a].add(b)
        adj[b].add(a)
    return len(_reached(adj, next(iter(members)))) == len(members)


def strongly_connected(members, pairs) -> bool:
    """Directed: every member reaches every other (forward and backward from one)."""
    fwd = {m: set() for m in members}
    back = {m: set() for m in members}
    for a, b in pairs:
        fwd[a].add(b)
        back[b].add(a)
    start = next(iter(members))
    return all(len(_reached(adj, start)) == len(members) for adj in (fwd, back))


@pytest.mark.parametrize("text", ["", "Full", "ring ", "k-regular", "k-regular:0",
                                  "k-regular:-1", "random-out:", "random-out:1.5",
                                  "random-out:01", "star", "k-regular:99999", "x" * 100, 3,
                                  None])
def test_bad_specs_are_refused_by_name(text):
    with pytest.raises(LocalError, match="rules.topology"):
        parse_topology(text, "rules.topology")


def test_degree_above_members_and_odd_k_on_odd_n_refused():
    with pytest.raises(LocalError, match="at most 7 peers"):
        build_topology("random-out:8", keys(8), SEED)
    with pytest.raises(LocalError, match="odd k needs an even number"):
        build_topology("k-regular:3", keys(7), SEED)
    with pytest.raises(LocalError, match="never hear each other"):
        build_topology("k-regular:1", keys(4), SEED)
    topo = build_topology("ring", keys(4), SEED)
    with pytest.raises(LocalError, match="not a member"):
        topo.out_peers("nobody", 0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), r=st.integers(0, 1000))
def test_full_is_everyone(n, r):
    topo = build_topology("full", keys(n), SEED)
    for m in topo.members:
        assert set(topo.out_peers(m, r)) == set(topo.members) - {m}
        assert set(topo.in_peers(m, r)) == set(topo.members) - {m}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), r=st.integers(0, 1000))
def test_ring_is_the_two_beside_it_on_the_sorted_keys(n, r):
    members = keys(n)
    topo = build_topology("ring", reversed(members), SEED)  # order given does not matter
    ordered = sorted(members)
    for i, m in enumerate(ordered):
        want = {ordered[(i - 1) % n], ordered[(i + 1) % n]} - {m}
        assert set(topo.out_peers(m, r)) == want == set(topo.in_peers(m, r))
        assert len(want) == min(2, n - 1)
    check_in_is_reverse_of_out(topo, r)
    assert connected(topo.members, edges(topo, r))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 60), k=st.integers(1, 59), r=st.integers(0, 100))
def test_k_regular_is_fixed_k_regular_symmetric_and_connected(n, k, r):
    if k > n - 1 or (k % 2 and n % 2) or k == 1:
        return
    topo = build_topology(f"k-regular:{k}", keys(n), SEED)
    for m in topo.members:
        out = topo.out_peers(m, r)
        assert len(out) == k and m not in out
        assert out == topo.out_peers(m, r + 1)  # the same every round
        assert set(out) == set(topo.in_peers(m, r))
    check_in_is_reverse_of_out(topo, r)
    assert connected(topo.members, edges(topo, r))


def test_k_regular_depends_on_the_consortium_id():
    a = build_topology("k-regular:4", keys(30), SEED)
    b = build_topology("k-regular:4", keys(30), bytes(32))
    assert edges(a, 0) != edges(b, 0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 50), s=st.integers(1, 49), r=st.integers(0, 10_000))
def test_random_out_sends_to_s_others_and_in_peers_are_whoever_drew_us(n, s, r):
    if s > n - 1:
        return
    topo = build_topology(f"random-out:{s}", keys(n), SEED)
    for m in topo.members:
        out = topo.out_peers(m, r)
        assert len(set(out)) == len(out) == s and m not in out
    check_in_is_reverse_of_out(topo, r)


def test_random_out_draws_anew_each_round_and_the_union_connects():
    topo = build_topology("random-out:2", keys(64), SEED)
    assert edges(topo, 0) != edges(topo, 1)
    assert strongly_connected(topo.members, edges(topo, 0) | edges(topo, 1) | edges(topo, 2))
    # in-degree varies (it is the draws of the others), out-degree does not
    ins = [len(topo.in_peers(m, 0)) for m in topo.members]
    assert sum(ins) == 2 * 64 and max(ins) > min(ins)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 70), r=st.integers(0, 1000))
def test_exponential_is_one_peer_at_a_power_of_two(n, r):
    topo = build_topology("exponential", keys(n), SEED)
    ordered = sorted(keys(n))
    period = max(1, math.ceil(math.log2(n)))
    hop = (2 ** (r % period)) % n
    for i, m in enumerate(ordered):
        want = () if hop == 0 else (ordered[(i + hop) % n],)
        assert topo.out_peers(m, r) == want
    check_in_is_reverse_of_out(topo, r)
    union = set().union(*(edges(topo, q) for q in range(r, r + period)))
    assert strongly_connected(topo.members, union)


@pytest.mark.parametrize("spec", ["full", "ring", "k-regular:4", "random-out:3", "exponential"])
def test_every_member_computes_everyones_peers_identically(spec):
    """Each member builds its own Topology (members listed in its own order) and gets the
    same out- and in-sets for everyone, round by round: nobody has to be told."""
    members = keys(24)
    views = [build_topology(spec, members[i:] + members[:i], SEED) for i in range(0, 24, 5)]
    for r in range(6):
        first = {m: (views[0].out_peers(m, r), views[0].in_peers(m, r)) for m in members}
        for v in views[1:]:
            assert {m: (v.out_peers(m, r), v.in_peers(m, r)) for m in members} == first


def test_random_out_is_pinned_to_sha256_draws():
    """The draw is the documented SHA-256 stream, not Python's random: a change of the
    algorithm would split a consortium whose members run different flnode versions."""
    topo = build_topology("random-out:2", ["a", "b", "c", "d", "e"], b"id")
    assert [topo.out_peers(m, 7) for m in "abcde"] == PINNED


# Frozen from the first run of this code (never recomputed here).
PINNED = [("b", "e"), ("d", "e"), ("d", "e"), ("a", "b"), ("a", "d")]


# --- [rules] topology: pinned with the id, "full" without the key ----------------------

def test_a_consortium_without_the_key_is_full_mesh_and_keeps_its_id():
    from pathlib import Path

    from gossip.membership import load_consortium
    from node.strategy.consortium_rules import agreed_topology, pin_rules, rules_table

    golden = load_consortium(Path(__file__).parent / "golden" / "consortium.toml")
    assert "topology" not in golden.rules and agreed_topology(golden).full
    assert "topology" not in rules_table(8, "mean", topology="full")
    assert rules_table(8, topology="full")["echo"] is True  # full: the echo as before
    table = pin_rules(rules_table(16, topology="random-out:4"), 16)
    assert table["topology"] == "random-out:4" and "echo" not in table
    # the defaults are sized for the 5 shares a member combines, not for 16 members; the
    # rule on neighbours is centered clipping (tests/test_clipped_gossip.py)
    assert table["aggregation"] == "centered_clipping" and table["f"] == 1
    with_key = type(golden)(golden.name, golden.schema, golden.members, table)
    without = type(golden)(golden.name, golden.schema, golden.members,
                           {k: v for k, v in table.items() if k != "topology"})
    assert with_key.id != without.id
    assert agreed_topology(with_key).name == "random-out:4"
    for bad, why in (("star", "rules.topology"), ("ring:2", "rules.topology")):
        with pytest.raises(LocalError, match=why):
            agreed_topology(type(golden)(golden.name, golden.schema, golden.members,
                                         {"aggregation": "mean", "topology": bad}))
    with pytest.raises(LocalError, match="echo = true needs topology"):
        agreed_topology(type(golden)(golden.name, golden.schema, golden.members,
                                     {"aggregation": "mean", "topology": "ring", "echo": True}))


def test_secure_aggregation_needs_the_full_mesh():
    """A secure round deals pieces to every member and opens sums every member decodes
    alike: a sparse topology with secure = true is refused by name, at both the rules
    check and consortium build's pin; the threshold is sized on every member."""
    from pathlib import Path

    from gossip.membership import load_consortium
    from node.strategy.consortium_rules import agreed_topology, pin_rules, rules_table

    golden = load_consortium(Path(__file__).parent / "golden" / "consortium.toml")
    with pytest.raises(LocalError, match="secure = true needs topology"):
        agreed_topology(type(golden)(golden.name, golden.schema, golden.members,
                                     {"aggregation": "mean", "topology": "ring",
                                      "secure": True}))
    with pytest.raises(LocalError, match="secure = true needs topology"):
        pin_rules(rules_table(16, topology="random-out:4", secure=True), 16)
    assert rules_table(16, secure=True)["secure_threshold"] == 5  # n >= 3t + 1 at 16


def test_scenario_key_and_flag_reach_the_spec(tmp_path):
    from node.rehearsal.simulation.scenario import read_scenario

    path = tmp_path / "s.toml"
    path.write_text('topology = "k-regular:4"\n')
    assert read_scenario(path)[0]["topology"] == "k-regular:4"
    path.write_text('topology = "k-regular"\n')
    with pytest.raises(LocalError, match="topology.*k-regular"):
        read_scenario(path)
