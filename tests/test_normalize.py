"""Federated normalization: members agree mean and std before round 1 from (noised,
clipped) sums, identically, and a hostile member's sums cannot move them far."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pandas as pd
import pytest

from gossip import bodies, envelope
from gossip.bodies import NORM_RANGE, NORM_USABLE, Stats
from gossip.envelope import KIND_NORM, KIND_STATS
from gossip.membership import Consortium, save_consortium
from gossip.transports.base import Incoming
from gossip.transports.memory import MemoryHub
from node.data.schema import FeatureSchema
from node.learn.normalize import combine, implausible, member_stats, sensitivity, stats_digest
from node.privacy.mechanisms import SeededNoise
from node.rehearsal.simulation.prepare import prepare
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.config import load_config
from node.runtime.node import Node
from node.runtime.state import read_jsonl
from tests.test_runner import run_all

RANGES = {"balance": [0.0, 3000.0], "income": [0.0, 80000.0]}


def federated(schema: FeatureSchema, **extra) -> FeatureSchema:
    doc = schema.to_dict()
    for col in doc["columns"]:
        if col["kind"] == "numeric":
            col.pop("mean"), col.pop("std")
            col["range"] = RANGES[col["name"]]
    return FeatureSchema.from_dict({**doc, "normalize": "federated", **extra}, "test")


def make(tmp_path, nodes=3, rounds=2, privacy="off", deadline=30.0, **schema_extra):
    spec = SimulationSpec(dataset="default", nodes=nodes, partition="iid", rounds=rounds,
                          seed=0, out=tmp_path, privacy=privacy, epsilon=3.0 if privacy ==
                          "record" else None, sigma=None if privacy == "record" else 1.0,
                          round_deadline_s=deadline)
    prep = prepare(spec)
    c = prep.consortium
    schema = federated(FeatureSchema.from_dict(c.schema, "test"), **schema_extra)
    fed = Consortium(c.name, schema.to_dict(), c.members, c.rules)
    save_consortium(fed, tmp_path / "consortium.toml")
    return prep, schema


def build(prep, cls=Node, which=None):
    hub = MemoryHub()
    return [(cls if which is None or i in which else Node).from_config(
        load_config(p), hub.attach(n, prep.names), SeededNoise(i))
        for i, (n, p) in enumerate(zip(prep.names, prep.config_paths, strict=True))]


def pooled(prep, schema) -> dict[str, tuple[float, float]]:
    rows = pd.concat([pd.read_parquet(load_config(p).data.path) for p in prep.config_paths])
    out = {}
    for c in schema.columns:
        if c.kind == "numeric":
            v = np.clip(rows[c.name].to_numpy(float), *c.range)
            out[c.name] = (float(v.mean()), float(v.std()))
    return out


async def test_without_privacy_every_member_agrees_the_pooled_statistics(tmp_path):
    prep, schema = make(tmp_path)
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    digests = {n.normalization.digest for n in nodes}
    assert len(digests) == 1  # identical at every member
    want = pooled(prep, schema)
    for col, (mean, std) in nodes[0].normalization.stats.items():
        assert mean == pytest.approx(want[col][0], rel=1e-9)
        assert std == pytest.approx(want[col][1], rel=1e-9)
    for n in nodes:  # every share carried the agreed digest and none was refused for it
        assert "norm_mismatch" not in n.rejected()
        lines = read_jsonl(n.state.path / "metrics.jsonl")
        assert [x["round"] for x in lines] == [0, 1]
        assert np.isfinite(n.held_out.X).all() and abs(n.train_data.X[:, -2:].mean()) < 0.5


async def test_record_dp_charges_the_statistics_once_and_a_restart_never_recomputes(tmp_path):
    prep, schema = make(tmp_path, privacy="record", normalize_noise=5.0)
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 600)
    n = nodes[0]
    charges = [r for r in n.ledger.records if r.mode == "normalize"]
    assert len(charges) == 1 and charges[0].noise_multiplier == 5.0
    sent = (n.state.path / "stats.envelope").read_bytes()
    assert charges[0].share_digest == envelope.decode_outer(sent).digest.hex()
    assert n.budget.plan.normalize_sigma == 5.0
    assert n.epsilon() <= 3.0 + 1e-9
    # noised: the agreed values differ from the pooled ones, but not by much
    want = pooled(prep, schema)
    got = n.normalization.stats
    assert got != want
    for col in want:
        lo, hi = schema.columns[[c.name for c in schema.columns].index(col)].range
        assert abs(got[col][0] - want[col][0]) < 0.05 * (hi - lo)
    # `flnode status` shows it, with its own share of the budget.
    from node.ops.status import collect, render

    st = collect(n.state.path)
    assert st["normalization"]["noise_multiplier"] == 5.0
    assert 0 < st["normalization"]["epsilon_alone"] < n.epsilon()
    assert "normalize   federated, agreed with 3 members" in render(st)
    assert "2 of 2 rounds completed (finished)" in render(st)
    # A restart loads what was agreed: no second charge, the same statistics and digest.
    again = Node.from_config(load_config(prep.config_paths[0]),
                             MemoryHub().attach(prep.names[0], prep.names), SeededNoise(9))
    assert again.normalization.digest == n.normalization.digest
    assert [r for r in again.ledger.records if r.mode == "normalize"] == charges
    np.testing.assert_array_equal(again.train_data.X, n.train_data.X)


@pytest.mark.parametrize("rows,refused", [(1e9, False), (1e13, True)])
async def test_a_member_signed_hostile_statistics_are_capped_or_refused(tmp_path, rows, refused):
    """bank-3 signs statistics with its own valid key: 1e9 rows all at the top of each
    range (plausible in form: capped to its agreed share), or 1e13 rows (refused as no
    honest member's, and left out). It never trains: the honest three go on without it."""
    from node.runtime.identity import load_identity

    prep, schema = make(tmp_path, nodes=4, rounds=1, deadline=5.0)
    nodes = build(prep)[:3]
    key = load_identity(tmp_path / "keys" / "bank-3.key").signing_key
    hostile = Stats(rows, np.full(2, rows / 2), np.full(2, rows / 4))  # v = 1/2: the top
    vote = envelope.pack(key, nodes[0].consortium.id, KIND_NORM, 0, 0, NORM_USABLE)
    data = envelope.pack(key, nodes[0].consortium.id, KIND_STATS, 0, 1,
                         bodies.encode_stats(hostile))
    for n in nodes:
        n.handle(Incoming(vote, "bank-3"))
        n.handle(Incoming(data, "bank-3"))
    await asyncio.wait_for(run_all(nodes), 300)
    honest = pooled(prep, schema)  # includes bank-3's real file, near enough for a bound
    for n in nodes:
        agreed = n.normalization
        if refused:
            assert n.rejected()["bad_stats"] == 1
            assert agreed.members == ("bank-0", "bank-1", "bank-2")
        else:
            assert agreed.members == tuple(prep.names)
            assert agreed.capped == {"bank-3": pytest.approx(0.5)}  # the cap, not 1e9 rows
        for col, (mean, _) in agreed.stats.items():
            lo, hi = RANGES[col]
            # a member at the cap (half of the total with 4 members) moves a mean at most
            # halfway to the end of the range; refused, it moves nothing
            limit = 0.5 * (hi - lo) + 0.5 * honest[col][0] if not refused else honest[col][0]
            assert mean <= limit + 0.02 * (hi - lo)
    assert len({n.normalization.digest for n in nodes}) == 1


def test_implausible_sums_are_named():
    k = 2
    s = 10.0 * sensitivity(k) * 6.5  # beyond the noise tail
    assert "rows" in implausible(Stats(-s, np.zeros(k), np.zeros(k)), 10.0, k)
    assert "sum[1]" in implausible(Stats(100.0, np.array([1.0, 50.0 + s]), np.zeros(k)), 10.0, k)
    assert "sum[0]" in implausible(Stats(100.0, np.array([-50.0 - s, 0]), np.zeros(k)), 10.0, k)
    assert "sumsq[0]" in implausible(Stats(100.0, np.zeros(k), np.array([-s, 0.0])), 10.0, k)
    assert "sumsq[1]" in implausible(Stats(100.0, np.zeros(k), np.array([0, 25.0 + s])), 10.0, k)
    assert implausible(Stats(100.0, np.array([-50.0, 50.0]), np.full(k, 25.0)), 10.0, k) is None
    # exact sums (privacy off): the bounds are exact
    assert implausible(Stats(100.0, np.array([50.0, 0]), np.full(k, 25.0)), None, k) is None
    assert "sum[0]" in implausible(Stats(100.0, np.array([50.1, 0]), np.zeros(k)), None, k)


def test_combination_is_order_independent_and_handles_a_constant_column():
    doc = {"label": "y", "classes": ["0", "1"], "normalize": "federated", "columns": [
        {"name": "a", "kind": "numeric", "range": [0.0, 10.0]},
        {"name": "flat", "kind": "numeric", "range": [5.0, 5.0]}]}
    schema = FeatureSchema.from_dict(doc, "t")
    dfs = {f"m{i}": pd.DataFrame({"a": np.arange(10.0) + i, "flat": 5.0, "y": "0"})
           for i in range(3)}
    msgs = {m: member_stats(df, schema, m) for m, df in dfs.items()}
    one = combine(msgs, schema, None)
    two = combine(dict(reversed(list(msgs.items()))), schema, None)
    assert one == two and one.digest == stats_digest(one.stats, one.members)
    pooled_a = np.clip(np.concatenate([df["a"].to_numpy() for df in dfs.values()]), 0, 10)
    assert one.stats["a"] == pytest.approx((pooled_a.mean(), pooled_a.std()), rel=1e-12)
    assert one.stats["flat"] == (5.0, 0.0)
    enc = schema.with_stats(one.stats)
    from node.data.encode import encode
    X, _ = encode(dfs["m0"], enc, "m0")
    assert (X[:, 1] == 0).all()  # constant: encoded as 0, not refused
    json.dumps(one.to_json())


def test_federated_normalization_is_refused_with_update_level_dp(tmp_path):
    from gossip.errors import LocalError
    spec = SimulationSpec(dataset="default", nodes=2, partition="iid", rounds=1, seed=0,
                          out=tmp_path, privacy="update", clip=0.1, sigma=1.0)
    prep = prepare(spec)
    c = prep.consortium
    schema = federated(FeatureSchema.from_dict(c.schema, "test"))
    save_consortium(Consortium(c.name, schema.to_dict(), c.members, c.rules),
                    tmp_path / "consortium.toml")
    with pytest.raises(LocalError, match="privacy.mode = \"update\""):
        Node.from_config(load_config(prep.config_paths[0]),
                         MemoryHub().attach(prep.names[0], prep.names), SeededNoise(0))


async def test_a_member_that_combined_differently_is_found_out_at_its_first_share(tmp_path):
    """bank-2 encodes with other statistics than the rest (as if it had combined other
    messages): every share says which, and each side refuses the other's at once."""
    from node.learn.normalize import Agreed

    class Deviant(Node):
        def _adopt(self, agreed, saved=False):
            if not saved:
                stats = {c: (m * 1.01, s) for c, (m, s) in agreed.stats.items()}
                agreed = Agreed(stats, agreed.members, agreed.capped,
                                stats_digest(stats, agreed.members))
            super()._adopt(agreed, saved)

    prep, _ = make(tmp_path, rounds=2, deadline=5.0)
    nodes = build(prep, cls=Deviant, which=[2])
    await asyncio.wait_for(run_all(nodes), 300)
    honest, deviant = nodes[:2], nodes[2]
    assert type(deviant) is Deviant and honest[0].normalization == honest[1].normalization
    for n in honest:
        assert n.rejected()["norm_mismatch"] == 2  # bank-2's share, in both rounds
        refused = [x for x in read_jsonl(n.state.path / "audit.jsonl")
                   if x.get("outcome") == "norm_mismatch"]
        assert {x["member"] for x in refused} == {"bank-2"}
    assert deviant.rejected()["norm_mismatch"] == 4  # both others', both rounds


def test_the_check_at_start_follows_from_rows_members_and_noise():
    """usability: e = sigma Delta sqrt(M) / N of the range per noise std; passes exactly
    where both limits hold, and what it says it needs passes."""
    from node.learn.normalize import MAX_STD_ERROR, usability

    schema = federated(FeatureSchema.from_dict({
        "label": "y", "classes": ["0", "1"], "columns": [
            {"name": "balance", "kind": "numeric", "mean": 0.0, "std": 1.0},
            {"name": "income", "kind": "numeric", "mean": 0.0, "std": 1.0}]}, "t"))
    small = usability(schema, 3, 364, 10.0)
    assert not small.ok and small.failing == ("balance", "income")
    assert sensitivity(2) == pytest.approx(np.sqrt(1 + 2 * (1 / 4 + 1 / 16)))
    e = 10.0 * sensitivity(2) * np.sqrt(3) / 364
    assert small.mean_error == pytest.approx(e / 0.1)
    assert small.std_error == pytest.approx(np.sqrt(2) * e / 0.02)
    assert usability(schema, 3, small.rows_needed, 10.0).ok
    assert not usability(schema, 3, small.rows_needed - 2, 10.0).ok
    assert usability(schema, 3, 364, small.sigma_needed * 0.999).ok
    assert usability(schema, 3, 364, small.sigma_needed).std_error == pytest.approx(
        MAX_STD_ERROR)
    assert usability(schema, 3, 364, None).ok  # privacy off: exact sums
    assert usability(schema, 8, 100_000, 10.0).ok
    assert usability(schema, 3, 8000, 10.0).ok  # the default table, 3 banks


@pytest.mark.parametrize("fallback", [None, "refuse", "range"])
async def test_the_check_at_start_refuses_or_falls_back_before_anything_is_charged(
        tmp_path, fallback):
    """Record-level DP at the default noise with a declared 1,000 rows in all: the agreed
    stds would be off by 30 %. Without a fallback (or "refuse") the node stops at start,
    naming the columns and the fixes, with nothing charged or sent; with "range" every
    member scales by the declared ranges and trains, with no statistics charged."""
    from gossip.errors import LocalError

    extra = {} if fallback is None else {"normalize_fallback": fallback}
    prep, schema = make(tmp_path, privacy="record", normalize_rows=1000, **extra)
    if fallback != "range":
        with pytest.raises(LocalError) as err:
            build(prep)
        text = str(err.value)
        for want in ("'balance', 'income'", "Nothing was released or charged",
                     "normalize = \"range\"", "normalize_noise = 1.6", "training rows in all",
                     "about 1000 training rows in all"):
            assert want in text
        state = load_config(prep.config_paths[0]).state_dir
        ledger = state / "ledger.jsonl"
        assert not ledger.exists() or ledger.read_text().strip() == ""
        assert not (state / "stats.envelope").exists()
        return
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 600)
    for n in nodes:  # every member voted for range scaling: the consortium scales by ranges
        assert [r for r in n.ledger.records if r.mode == "normalize"] == []
        assert n.budget.plan.normalize_sigma is None  # nothing reserved for statistics
        assert n.normalization.mode == "range" and n.normalization.fallback == tuple(prep.names)
        assert np.abs(n.train_data.X[:, :2]).max() <= 1.0  # the ranges map onto [-1, 1]
        assert [x["round"] for x in read_jsonl(n.state.path / "metrics.jsonl")] == [0, 1]
        assert not (n.state.path / "stats.envelope").exists()


def test_the_simulators_baselines_use_what_the_members_would_agree(tmp_path):
    """baseline_schema: noised statistics where the check passes (not the exact pooled
    ones), range scaling where the members fall back, the members' refusal where they
    refuse: the baselines' columns carry what normalization costs."""
    from gossip.errors import LocalError
    from node.rehearsal.simulation.prepare import baseline_schema

    prep, schema = make(tmp_path, privacy="off")
    rows = {n: pd.read_parquet(load_config(p).data.path)
            for n, p in zip(prep.names, prep.config_paths, strict=True)}
    exact, how = baseline_schema(schema, rows, 0.5, "off")
    assert "exact pooled" in how
    noisy_schema = FeatureSchema.from_dict({**schema.to_dict(), "normalize_noise": 5.0}, "t")
    noisy, how = baseline_schema(noisy_schema, rows, 0.5, "record")
    assert "noised as the members' are (σₙ 5)" in how
    for a, b in zip(exact.columns, noisy.columns, strict=True):
        if a.kind == "numeric":
            assert a.mean != b.mean and abs(a.mean - b.mean) < 0.05 * (a.range[1] - a.range[0])
    few = {**schema.to_dict(), "normalize_rows": 1000}  # declared: too few for σₙ 10
    fell = FeatureSchema.from_dict({**few, "normalize_fallback": "range"}, "t")
    ranged, how = baseline_schema(fell, rows, 0.5, "record")
    assert ranged.mode == "range" and "scale by the declared ranges" in how
    assert {c.name: (c.mean, c.std) for c in ranged.for_encoding().columns
            if c.kind == "numeric"} == {"balance": (1500.0, 1500.0), "income": (40000.0, 40000.0)}
    with pytest.raises(LocalError, match="too noisy to use"):
        baseline_schema(FeatureSchema.from_dict(few, "t"), rows, 0.5, "record")
    assert baseline_schema(schema, rows, 0.5, "record")[0].mode == "federated"  # ~8,000 rows


def test_a_declared_total_makes_every_member_decide_alike():
    """resolve: with normalize_rows every member's check uses the declared total, whatever
    its own rows; without it each estimates members x its own rows (and the refusal says
    so); the fallback gives the same schema in range mode, nothing left to agree."""
    from gossip.errors import LocalError
    from node.learn.normalize import resolve

    base = {"label": "y", "classes": ["0", "1"], "normalize": "federated", "columns": [
        {"name": "a", "kind": "numeric", "range": [0.0, 10.0]},
        {"name": "b", "kind": "numeric", "range": [0.0, 1.0]}]}
    declared = FeatureSchema.from_dict({**base, "normalize_rows": 100_000}, "t")
    for own in (10, 10_000):
        got, check, note = resolve(declared, 3, own, "record", 1e-5, "m")
        assert got is declared and check.ok and check.rows == 100_000 and note is None
    with pytest.raises(LocalError, match="estimated here as 3 members x this member's 10 rows"):
        resolve(FeatureSchema.from_dict(base, "t"), 3, 10, "record", 1e-5, "m")
    small = FeatureSchema.from_dict({**base, "normalize_rows": 300}, "t")
    with pytest.raises(LocalError) as err:
        resolve(small, 3, 10_000, "record", 1e-5, "m")
    assert "estimated here" not in str(err.value)
    fell = FeatureSchema.from_dict({**base, "normalize_rows": 300,
                                    "normalize_fallback": "range"}, "t")
    got, check, note = resolve(fell, 3, 10_000, "record", 1e-5, "m")
    assert got.mode == "range" and not check.ok and "'a', 'b'" in note
    assert got.range_stats() == {"a": (5.0, 5.0), "b": (0.5, 0.5)}
    assert resolve(fell, 3, 10, "off", 1e-5, "m")[0] is fell  # exact sums: always usable
    with pytest.raises(LocalError, match="normalize_rows is about federated"):
        FeatureSchema.from_dict({**base, "normalize": "range", "normalize_rows": 5}, "t")


def test_centred_sums_have_the_stated_sensitivity_and_combine_to_the_pooled_moments():
    """One record at any point of [lo, hi]^k moves (rows, sum, sumsq) by at most Delta,
    reached at a corner; combine recovers the pooled mean and std from centred sums."""
    doc = {"label": "y", "classes": ["0", "1"], "normalize": "federated", "columns": [
        {"name": f"c{j}", "kind": "numeric", "range": [-2.0, 6.0]} for j in range(5)]}
    schema = FeatureSchema.from_dict(doc, "t")
    rng = np.random.default_rng(0)
    base = pd.DataFrame({**{f"c{j}": rng.uniform(-3, 7, 40) for j in range(5)}, "y": "0"})
    before = member_stats(base, schema, "m")
    worst = 0.0
    for row in [rng.uniform(-3, 7, 5) for _ in range(200)] + [np.full(5, 6.0), np.full(5, -9.0)]:
        after = member_stats(pd.concat([base, pd.DataFrame(
            {**{f"c{j}": [row[j]] for j in range(5)}, "y": ["0"]})]), schema, "m")
        moved = np.sqrt((after.rows - before.rows) ** 2 + np.sum((after.sum - before.sum) ** 2)
                        + np.sum((after.sumsq - before.sumsq) ** 2))
        assert moved <= sensitivity(5) + 1e-12
        worst = max(worst, moved)
    assert worst == pytest.approx(sensitivity(5))  # the corners reach it
    agreed = combine({"m": before}, schema, None)
    v = np.clip(base["c0"].to_numpy(), -2, 6)
    assert agreed.stats["c0"] == pytest.approx((v.mean(), v.std()), rel=1e-12)


def shrink(prep, member: int, rows: int) -> None:
    """Keep the first `rows` rows of a member's data file (its own, smaller table)."""
    path = load_config(prep.config_paths[member]).data.path
    pd.read_parquet(path).iloc[:rows].to_parquet(path)


def build_waiting(prep, wait_s: float, cls=Node, which=()):
    """build, with gossip.normalize_wait_s = wait_s (main's straddling members stop after
    it: the test must not wait the default 300 s to fail there)."""
    hub = MemoryHub()
    out = []
    for i, (n, p) in enumerate(zip(prep.names, prep.config_paths, strict=True)):
        cfg = load_config(p)
        cfg = cfg.model_copy(update={"gossip": cfg.gossip.model_copy(
            update={"normalize_wait_s": wait_s})})
        out.append((cls if i in which else Node).from_config(cfg, hub.attach(n, prep.names),
                                                             SeededNoise(i)))
    return out


async def test_members_whose_own_rows_straddle_the_threshold_decide_alike(tmp_path):
    """No normalize_rows: bank-0 (300 rows) estimates too few rows in all and votes for
    range scaling, bank-1 and bank-2 (over 2,000 each) find the statistics usable. The
    consortium decides once, from the votes: all three scale by the declared ranges,
    encode alike, nothing is charged or sent for statistics, the shares match, and
    `flnode status` says so at every member."""
    from node.data.encode import encode
    from node.learn.normalize import range_schema, resolve
    from node.ops.status import collect, render

    prep, schema = make(tmp_path, privacy="record", normalize_fallback="range")
    shrink(prep, 0, 300)
    nodes = build_waiting(prep, 60.0)
    own = [resolve(schema, 3, len(n._tables.train), "record", 1e-5, n.name)[0].mode
           for n in nodes]
    assert own == ["range", "federated", "federated"]  # they straddle the threshold
    assert [n.budget.plan.normalize_sigma for n in nodes] == [None, 10.0, 10.0]
    await asyncio.wait_for(run_all(nodes), 600)
    assert len({n.normalization.digest for n in nodes}) == 1
    assert all(n.normalization == nodes[0].normalization for n in nodes)
    agreed = nodes[0].normalization
    assert agreed.mode == "range" and agreed.fallback == ("bank-0",)
    assert agreed.stats == schema.range_stats()
    ranged = range_schema(schema).for_encoding()
    for n in nodes:
        X, _ = encode(n._tables.train, ranged, "t")
        np.testing.assert_array_equal(n.train_data.X, X)  # every member encodes alike
        assert [r for r in n.ledger.records if r.mode == "normalize"] == []
        assert not (n.state.path / "stats.envelope").exists()
        assert "norm_mismatch" not in n.rejected()
        assert [x["round"] for x in read_jsonl(n.state.path / "metrics.jsonl")] == [0, 1]
        st = collect(n.state.path)
        assert st["normalization"]["mode"] == "range"
        assert st["normalization"]["fallback_by"] == ["bank-0"]
        assert "normalize   range: scaled by the declared ranges, as the consortium decided " \
               "(bank-0 voted for it" in render(st)
    # A restart keeps the decision (no new vote, nothing charged).
    again = Node.from_config(load_config(prep.config_paths[1]),
                             MemoryHub().attach(prep.names[1], prep.names), SeededNoise(9))
    assert again.normalization == agreed
    np.testing.assert_array_equal(again.train_data.X, nodes[1].train_data.X)


async def test_a_hostile_vote_cannot_split_the_honest_members_or_stop_them(tmp_path):
    """bank-2 signs, with its own valid key, a garbage vote, then "range", then a second,
    different vote ("usable"): the garbage is refused (bad_body), the second vote as
    equivocation, and every honest member acts on the same first vote: all scale by the
    declared ranges and train (it can force range scaling, which costs no privacy)."""
    from node.runtime.state import atomic_write

    class Hostile(Node):
        async def _send_vote(self):  # the driver's SendVote
            await self._broadcast(0, self._sign(KIND_NORM, 0, b"\x07"))
            vote = self._sign(KIND_NORM, 0, NORM_RANGE)
            atomic_write(self.state.path / self.VOTE_FILE, vote)
            await self._broadcast(0, vote)
            await self._broadcast(0, self._sign(KIND_NORM, 0, NORM_USABLE))
            self._norm_fallback = "its own (hostile) choice"  # it acts on what it stored
            await super()._send_vote()

    prep, _ = make(tmp_path, privacy="record", normalize_fallback="range")
    nodes = build_waiting(prep, 60.0, cls=Hostile, which=[2])
    await asyncio.wait_for(run_all(nodes), 600)
    honest = nodes[:2]
    assert honest[0].normalization == honest[1].normalization
    assert honest[0].normalization.mode == "range"
    assert honest[0].normalization.fallback == ("bank-2",)
    for n in honest:
        assert n.rejected()["bad_body"] == 1 and n.rejected()["equivocation"] == 1
        assert [r for r in n.ledger.records if r.mode == "normalize"] == []
        assert [x["round"] for x in read_jsonl(n.state.path / "metrics.jsonl")] == [0, 1]


async def test_without_fallback_votes_every_member_goes_on_to_the_statistics(tmp_path):
    """Every vote "usable" (privacy off: exact sums always are): phase B as before."""
    prep, _ = make(tmp_path, rounds=1)
    nodes = build(prep)
    await asyncio.wait_for(run_all(nodes), 300)
    assert {n.normalization.mode for n in nodes} == {"federated"}
    for n in nodes:
        vote = envelope.decode_outer((n.state.path / "norm.envelope").read_bytes())
        assert vote.kind == KIND_NORM and vote.body == NORM_USABLE


def test_the_range_decision_round_trips_and_is_checked():
    """normalization.json in mode "range": read back as written; its digest differs from
    the same numbers as statistics; one whose numbers are not the schema's ranges, or an
    unknown mode, is refused; a vote is one byte, 0 or 1."""
    from gossip.errors import LocalError, RemoteError
    from node.learn.normalize import Agreed, range_agreed

    schema = FeatureSchema.from_dict({"label": "y", "classes": ["0", "1"],
                                      "normalize": "federated", "columns": [
        {"name": "a", "kind": "numeric", "range": [0.0, 10.0]}]}, "t")
    agreed = range_agreed(schema, ("m2", "m1"), ("m2",), "m2 voted for it")
    doc = json.loads(json.dumps(agreed.to_json()))
    assert doc["mode"] == "range" and doc["fallback_by"] == ["m2"]
    assert Agreed.from_json(doc, schema) == agreed
    assert agreed.members == ("m1", "m2") and agreed.stats == {"a": (5.0, 5.0)}
    assert agreed.digest != stats_digest(agreed.stats, agreed.members)
    with pytest.raises(LocalError, match="digest does not match"):
        Agreed.from_json({**doc, "mode": "federated"}, schema)
    with pytest.raises(LocalError, match="unknown mode"):
        Agreed.from_json({**doc, "mode": "other"}, schema)
    with pytest.raises(LocalError, match="not the schema's ranges"):
        Agreed.from_json({**doc, "stats": {"a": [4.0, 5.0]},
                          "digest": stats_digest({"a": (4.0, 5.0)}, ("m1", "m2"),
                                                 "range").hex()}, schema)
    assert bodies.decode_norm(NORM_RANGE, True) is True
    assert bodies.decode_norm(NORM_USABLE, True) is False
    for bad in (b"", b"\x02", b"\x01\x01"):
        with pytest.raises(RemoteError, match="one byte"):
            bodies.decode_norm(bad, True)
    with pytest.raises(RemoteError, match="does not use normalize"):
        bodies.decode_norm(NORM_USABLE, False)


def test_a_restart_never_sends_a_different_vote(tmp_path):
    """The stored vote is re-sent as it is; if the node's check at start now says
    otherwise (its rows changed), it refuses to start rather than vote twice (or send
    statistics its plan reserved no noise for)."""
    from gossip.errors import LocalError

    prep, _ = make(tmp_path, privacy="record", normalize_fallback="range")
    first = Node.from_config(load_config(prep.config_paths[0]),
                             MemoryHub().attach(prep.names[0], prep.names), SeededNoise(0))
    vote, data = first._own_vote()
    assert vote is False and first._own_vote() == (False, data)  # stored, re-sent as is
    shrink(prep, 0, 300)  # now its check fails: it would vote for range scaling
    with pytest.raises(LocalError, match="privacy plan"):  # the stored plan refuses first
        Node.from_config(load_config(prep.config_paths[0]),
                         MemoryHub().attach(prep.names[0], prep.names), SeededNoise(1))
    (first.state.path / "privacy_plan.json").unlink()  # without it, the vote still does
    again = Node.from_config(load_config(prep.config_paths[0]),
                             MemoryHub().attach(prep.names[0], prep.names), SeededNoise(1))
    with pytest.raises(LocalError, match="voted usable before, but its check at start now "
                                         "says range scaling"):
        again._own_vote()
    with pytest.raises(LocalError, match="reserves no noise"):
        again._own_stats()
