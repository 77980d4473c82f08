from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gossip.errors import LocalError
from node.data.encode import encode
from node.data.schema import fit_schema
from node.rehearsal.simulation.datasets import load_demo, parse_row_partition, partition


def labels_df(n=1000, pos=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": rng.normal(size=n), "state": rng.choice(list("ABCDEFG"), n),
                         "y": np.where(rng.random(n) < pos, "Yes", "No")})


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:0.1", "column:state"])
def test_partitions_are_disjoint_and_cover_every_row(spec):
    df = labels_df()
    parts = partition(df, "y", 4, spec, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert len(parts) == 4 and sorted(joined.tolist()) == list(range(len(df)))


def test_column_partition_gives_whole_values_by_rank_mod_n():
    df = labels_df()
    parts = partition(df, "y", 3, "column:state", np.random.default_rng(0))
    for i, p in enumerate(parts):
        owned = set(df["state"].iloc[p])
        assert owned == {v for rank, v in enumerate("ABCDEFG") if rank % 3 == i}


def test_dirichlet_is_label_skewed_and_reproducible():
    df = labels_df(n=4000, pos=0.3)
    a = partition(df, "y", 4, "dirichlet:0.3", np.random.default_rng(1))
    b = partition(df, "y", 4, "dirichlet:0.3", np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    rates = [(df["y"].iloc[p] == "Yes").mean() for p in a]
    assert max(rates) - min(rates) > 0.1  # skewed, unlike iid


@pytest.mark.parametrize("bad", ["dirichlet:0", "dirichlet:x", "column:", "random", "iid:3"])
def test_bad_partition_specs_say_what_is_expected(bad):
    with pytest.raises(LocalError, match="expected|positive alpha"):
        parse_row_partition(bad)


def test_schema_encodes_identically_for_every_member():
    df = labels_df()
    schema = fit_schema(df, "y", ["state"])
    X_all, _ = encode(df, schema)
    X_part, _ = encode(df.iloc[:100], schema)
    np.testing.assert_array_equal(X_all[:100], X_part)  # no per-member scaling
    assert X_all.shape[1] == schema.n_features == 1 + 7


def test_encode_names_missing_columns_unknown_categories_and_bad_numbers():
    df = labels_df()
    schema = fit_schema(df, "y", ["state"])
    with pytest.raises(LocalError, match="missing column.*'x'"):
        encode(df.drop(columns=["x"]), schema)
    bad = df.copy()
    bad.loc[3, "state"] = "ZZ"
    with pytest.raises(LocalError, match="column 'state'.*ZZ"):
        encode(bad, schema)
    bad = df.copy()
    bad.loc[3, "x"] = np.nan
    with pytest.raises(LocalError, match="column 'x': 1 row"):
        encode(bad, schema)


@pytest.mark.parametrize("name, rows", [("default", 10_000), ("churn", 5_000), ("digits", 1_797)])
def test_demo_tables_ship_with_the_packages(name, rows):
    df, label, _ = load_demo(name)
    assert len(df) == rows and label in df.columns


@pytest.mark.parametrize("text, message", [
    ('[[members]]\nname = "bank-0"\n', "consortium.name: expected a string"),
    ('[consortium]\nname = "c"\n[[members]]\nname = "bank 0"\n', r"members\[0\].name"),
    ('[consortium]\nname = "c"\n[[members]]\nname = "b"\naddresses = 3\n', "addresses"),
    ('[consortium]\nname = "c"\n[[members]]\nname = "b"\n', "lists 1 members but --nodes is 4"),
    ('[consortium\n', "not valid TOML"),
])
def test_a_bad_network_template_is_refused_with_the_key_named(tmp_path, text, message):
    from node.rehearsal.simulation.prepare import network_template
    from node.rehearsal.simulation.spec import SimulationSpec

    path = tmp_path / "t.toml"
    path.write_text(text)
    spec = SimulationSpec(dataset="default", nodes=4, partition="iid", rounds=1, seed=0,
                          out=tmp_path, network_config=path)
    with pytest.raises(LocalError, match=message):
        network_template(spec)


def test_the_demo_template_names_four_banks_with_address_slots():
    from pathlib import Path

    from node.rehearsal.simulation.prepare import network_template
    from node.rehearsal.simulation.spec import SimulationSpec

    spec = SimulationSpec(dataset="default", nodes=4, partition="iid", rounds=1, seed=0,
                          out=Path("."), network_config=Path(__file__).resolve().parent.parent
                          / "network_configs" / "demo-4-banks.toml")
    t = network_template(spec)
    assert t.name == "demo-4-banks" and list(t.members) == [f"bank-{i}" for i in range(4)]
    assert t.members["bank-2"]["libp2p"].startswith("/ip4/127.0.0.1/tcp/")
