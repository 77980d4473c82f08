"""Key files: written 0600, looser ones refused with the fix, nothing secret printed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from gossip.errors import LocalError
from node.runtime.identity import Identity, load_identity, load_public_key, save_identity


def test_keygen_writes_0600_secret_and_matching_public(tmp_path):
    ident = Identity.generate("bank-0")
    secret, public = save_identity(ident, tmp_path)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    loaded = load_identity(secret)
    assert loaded.public_key == ident.public_key
    assert load_public_key(public) == ("bank-0", ident.public_key)
    assert bytes(ident.signing_key).hex() not in repr(loaded)


def test_group_or_world_readable_key_is_refused_with_the_fix(tmp_path):
    secret, _ = save_identity(Identity.generate("bank-0"), tmp_path)
    os.chmod(secret, 0o644)
    with pytest.raises(LocalError) as info:
        load_identity(secret)
    assert "0644" in str(info.value) and f"chmod 600 {secret}" in str(info.value)
    os.chmod(secret, 0o640)
    with pytest.raises(LocalError, match="too open"):
        load_identity(secret)


def test_public_key_file_as_identity_key_says_so_not_chmod(tmp_path):
    """identity.key pointed at NAME.pub used to say "chmod 600" it."""
    _, public = save_identity(Identity.generate("bank-0"), tmp_path)
    os.chmod(public, 0o644)
    with pytest.raises(LocalError) as info:
        load_identity(public)
    assert "is a public key file" in str(info.value) and "chmod" not in str(info.value)
    assert "bank-0.pub" in str(info.value)


def test_keygen_refuses_to_overwrite(tmp_path):
    save_identity(Identity.generate("bank-0"), tmp_path)
    with pytest.raises(LocalError, match="refusing to overwrite"):
        save_identity(Identity.generate("bank-0"), tmp_path)


def test_corrupt_key_file_names_the_problem(tmp_path):
    path = tmp_path / "x.key"
    path.write_text("flnode-ed25519-secret-v1\nname = bank-0\nseed = abcd\n")
    os.chmod(path, 0o600)
    with pytest.raises(LocalError, match="32 bytes"):
        load_identity(path)


def test_cli_keygen_then_consortium_build_and_show(tmp_path):
    import tomli_w

    from tests.helpers import SCHEMA

    def flnode(*args):
        return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                              text=True, cwd=tmp_path)

    for name in ("bank-0", "bank-1"):
        r = flnode("keygen", "--out", "keys", "--name", name)
        assert r.returncode == 0, r.stderr
        assert "public key" in r.stdout
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(SCHEMA))
    r = flnode("consortium", "build", "--name", "two-banks", "--schema", "schema.toml",
               "--member", "keys/bank-0.pub@memory=bank-0", "--member", "keys/bank-1.pub",
               "--out", "consortium.toml")
    assert r.returncode == 0, r.stderr
    r = flnode("consortium", "show", "consortium.toml")
    assert r.returncode == 0 and "bank-0" in r.stdout and "schema" in r.stdout
    r = flnode("keygen", "--out", "keys", "--name", "bank-0")
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr


@pytest.mark.parametrize("n, privacy, says", [
    (2, None, "owns the model"),
    (4, None, "held back, not stopped"),
    (3, "record", "under record-level DP it owned the model"),
    (5, "record", None),
])
def test_consortium_build_says_what_one_hostile_member_can_do_to_a_small_consortium(
        tmp_path, capsys, n, privacy, says):
    import tomli_w

    from node.cli import main
    from tests.helpers import SCHEMA

    names = [f"bank-{i}" for i in range(n)]
    for name in names:
        assert main(["keygen", "--out", str(tmp_path / "keys"), "--name", name]) == 0
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(SCHEMA))
    capsys.readouterr()
    argv = ["consortium", "build", "--name", "c", "--schema", str(tmp_path / "schema.toml"),
            "--out", str(tmp_path / "c.toml")]
    for name in names:
        argv += ["--member", str(tmp_path / "keys" / f"{name}.pub")]
    if privacy:
        argv += ["--privacy-mode", privacy, "--clip", "1.0"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    if says is None:
        assert "warning" not in err
    else:
        assert err.startswith("warning: ") and says in err and f"{n} members" in err
