"""The consortium id binds name, schema, members' keys and addresses, and rules."""

from __future__ import annotations

import copy

import pytest

from gossip.errors import LocalError, RemoteError
from gossip.membership import Consortium, Member, load_consortium, save_consortium
from tests.helpers import SCHEMA, consortium, keys, share_bytes, verifier_for

K = keys(3)


def test_id_binds_addresses_keys_names_and_schema():
    base = consortium(K)
    moved = Consortium(base.name, base.schema, tuple(
        Member(m.name, m.public_key, {"libp2p": "/ip4/10.0.0.1/tcp/4001"}) for m in base.members))
    assert moved.id != base.id
    assert moved.digests()["addresses"] != base.digests()["addresses"]
    assert moved.digests()["members"] == base.digests()["members"]  # says which part
    renamed = Consortium(base.name, base.schema, tuple(
        Member(m.name + "x", m.public_key) for m in base.members))
    assert renamed.id != base.id
    rekeyed = consortium(keys(4)[1:])
    assert rekeyed.id != base.id
    assert consortium(K, name="another").id != base.id


def _with_addresses(c, **addresses):
    return Consortium(c.name, c.schema, tuple(Member(m.name, m.public_key, dict(addresses))
                                              for m in c.members), c.rules)


@pytest.mark.parametrize("key, agreed, redirected", [
    ("mqtt", "mqtts://broker.bank.example:8883", "mqtts://evil.example:8883"),
    ("libp2p", "/ip4/10.0.0.1/tcp/4001", "/ip4/10.6.6.6/tcp/4001"),
    ("mqtt_cert_sha256", "ab" * 32, "cd" * 32),
])
def test_a_file_whose_addresses_were_redirected_is_refused(tmp_path, key, agreed, redirected):
    """Finding 5: the broker URL, the multiaddrs and the pinned broker certificate are part
    of the id, so a file redirected after it was agreed does not load under that id."""
    c = _with_addresses(consortium(K), **{key: agreed})
    path = tmp_path / "c.toml"
    save_consortium(c, path)
    assert load_consortium(path).id == c.id
    path.write_text(path.read_text().replace(agreed, redirected))
    with pytest.raises(LocalError, match="edited after it was built.*addresses"):
        load_consortium(path)
    assert _with_addresses(consortium(K), **{key: redirected}).id != c.id


def test_a_file_without_its_id_line_is_refused_with_the_reason(tmp_path):
    """Finding 6a: a file whose id line was deleted used to load with whatever id its
    (possibly edited) contents hash to."""
    c = consortium(K)
    path = tmp_path / "c.toml"
    save_consortium(c, path)
    path.write_text("\n".join(ln for ln in path.read_text().splitlines()
                              if not ln.startswith("id = ")))
    with pytest.raises(LocalError, match=f"no consortium.id line.*hash to {c.id.hex()}"):
        load_consortium(path)


def test_member_order_in_the_file_does_not_change_the_id():
    base = consortium(K)
    shuffled = Consortium(base.name, base.schema, tuple(reversed(base.members)))
    assert shuffled.id == base.id


def test_schema_with_columns_in_another_order_is_refused_by_consortium_id():
    ours = consortium(K)
    theirs_schema = copy.deepcopy(SCHEMA)
    theirs_schema["columns"] = list(reversed(theirs_schema["columns"]))  # same shapes
    theirs = consortium(K, schema=theirs_schema)
    assert theirs.id != ours.id
    assert theirs.digests()["members"] == ours.digests()["members"]
    assert theirs.digests()["schema"] != ours.digests()["schema"]
    v = verifier_for(ours, K[0])
    with pytest.raises(RemoteError) as info:
        v.verify(share_bytes(K[1], theirs), 0)
    assert info.value.reason == "consortium"
    assert "feature schemas differ" in str(info.value)


def test_file_roundtrip_keeps_the_id(tmp_path):
    c = consortium(K)
    save_consortium(c, tmp_path / "c.toml")
    assert load_consortium(tmp_path / "c.toml").id == c.id


def test_edited_file_with_stale_id_is_refused(tmp_path):
    c = consortium(K)
    path = tmp_path / "c.toml"
    save_consortium(c, path)
    path.write_text(path.read_text().replace('name = "bank-1"', 'name = "bank-9"'))
    with pytest.raises(LocalError, match="edited after it was built"):
        load_consortium(path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('public_key = "', 'public_key = "zz', 1), r"members\[0\].public_key"),
    (lambda t: t.replace('name = "bank-2"', 'name = "bank 2!"'), r"members\[2\].name"),
    (lambda t: t.replace("[consortium]", "[consortiumx]"), "missing key 'consortium'"),
    (lambda t: t.replace('name = "bank-2"', 'name = "bank-1"'), "repeated"),
])
def test_bad_consortium_files_name_the_key(tmp_path, edit, message):
    c = consortium(K)
    path = tmp_path / "c.toml"
    save_consortium(c, path)
    text = "\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("id = "))
    path.write_text(edit(text))
    with pytest.raises(LocalError, match=message):
        load_consortium(path)


def test_schema_by_path_and_hash(tmp_path):
    import hashlib

    import tomli_w

    schema_file = tmp_path / "schema.toml"
    schema_file.write_text(tomli_w.dumps(SCHEMA))
    digest = hashlib.sha256(schema_file.read_bytes()).hexdigest()
    c = consortium(K)
    members = "\n".join(
        f'[[members]]\nname = "{m.name}"\npublic_key = "{m.public_key.hex()}"\n'
        f'[members.addresses]\nmemory = "{m.name}"\n' for m in c.members)
    path = tmp_path / "c.toml"
    path.write_text(f'[consortium]\nname = "{c.name}"\nid = "{c.id.hex()}"\n'
                    f'schema_path = "schema.toml"\nschema_sha256 = "{digest}"\n\n{members}')
    assert load_consortium(path).id == c.id
    schema_file.write_text(schema_file.read_text() + "\n# edited\n")
    with pytest.raises(LocalError, match="not the one the consortium agreed on"):
        load_consortium(path)
