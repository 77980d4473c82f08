"""Real OS processes: four `flnode run` daemons gossiping through a real mosquitto."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from nacl.bindings import crypto_sign_ed25519_sk_to_curve25519
from nacl.public import PrivateKey
from rich.console import Console

from gossip import envelope
from gossip.envelope import BENIGN_REASONS
from gossip.errors import RemoteError
from gossip.seal import PrekeyStore, open_sealed, seal_ad
from node.rehearsal.simulation.output import simulate
from node.rehearsal.simulation.spec import SimulationSpec
from node.runtime.identity import load_identity
from node.runtime.state import read_jsonl
from tests.mqtt_support import require_mosquitto

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def simulate_mqtt(out: Path, *extra: str, rounds: int = 10) -> tuple[dict, str]:
    require_mosquitto()
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate_network.py"), "--transport", "mqtt",
         "--dataset", "churn", "--nodes", "4", "--partition", "column:state", "--rounds",
         str(rounds), "--seed", "0", "--out", str(out), *extra], capture_output=True,
        text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), r.stdout


def test_four_processes_over_mosquitto_match_the_in_process_simulation(tmp_path):
    # 5 rounds: the match and the broker's view are the same at 5 as at 10 (the killed-node
    # test below runs 10)
    net, stdout = simulate_mqtt(tmp_path / "net", "--record-wire", rounds=5)
    assert "round   5/5" in stdout
    pid = int(re.search(r"mosquitto pid (\d+) on mqtt://127\.0\.0\.1:\d+", stdout).group(1))
    assert f"stopped mosquitto (pid {pid})" in stdout
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    mem = simulate(SimulationSpec(dataset="churn", nodes=4, partition="column:state", rounds=5,
                                  seed=0, out=tmp_path / "mem", keep_releases=True),
                   Console(quiet=True))
    assert net["transport"] == "mqtt"
    for name, auc in mem["consortium"]["per_node"].items():
        assert abs(net["consortium"]["per_node"][name] - auc) <= 0.01, (name, auc)
    assert net["rejected"] == {}
    assert all(p["exit_codes"] == [0] for p in net["processes"].values())
    # Each node's config points at its own password file (0600) from the generated set.
    for name in net["processes"]:
        pw = tmp_path / "net" / "broker" / f"{name}.password"
        assert pw.stat().st_mode & 0o777 == 0o600
    check_the_broker_saw_only_ciphertext(tmp_path / "net", net, tmp_path / "mem", rounds=5)


def check_the_broker_saw_only_ciphertext(out: Path, net: dict, plain_run: Path,
                                         rounds: int) -> None:
    """An observer account subscribed to '#' (the broker's operator) got every share, and
    none of it is readable: no plaintext tensor bytes, and neither an outsider's prekey nor
    any member's identity key opens a single one. The plaintext to look for comes from the
    in-process run with the same seed (memory transport, not sealed), whose shares are the
    network run's: the nodes delete their own plain bodies once a round is closed."""
    wire = msgpack.unpackb((out / "wire.msgpack").read_bytes(), raw=False)
    envs = [envelope.decode_outer(payload) for _, payload in wire]
    sealed = [e for e in envs if e.kind == envelope.KIND_SEALED]
    # no share in clear; seen reports and echoes ([rules] echo) carry only the digests of
    # sealed envelopes, the final message only a digest of the model every member holds
    assert {e.kind for e in envs} == {envelope.KIND_SEALED, envelope.KIND_PREKEY,
                                      envelope.KIND_HELLO, envelope.KIND_SEEN,
                                      envelope.KIND_ECHO, envelope.KIND_FINAL}
    assert len({(e.sender, e.round) for e in sealed}) == 4 * rounds  # every share, once or more
    everything = b"".join(payload for _, payload in wire)
    plain = sorted((plain_run / "state").glob("*/outbox/round-*.env"))
    assert len(plain) == 4 * rounds
    for env_file in plain:
        env = envelope.decode_outer(env_file.read_bytes())
        assert env.kind == envelope.KIND_SHARE
        for _, _, _, raw in msgpack.unpackb(env.body, raw=False)["tensors"]:
            assert raw[:64] not in everything, env_file
    for name in net["processes"]:  # and nothing a node could open it with is left
        assert not list((out / "state" / name / "prekeys").glob("*"))
        assert not list((out / "state" / name / "outbox").glob("*.body"))
    thieves = PrekeyStore({0: PrivateKey.generate()})  # an outsider's own prekey
    for key_file in (out / "keys").glob("*.key"):
        ident = load_identity(key_file)
        sk = bytes(ident.signing_key) + ident.public_key
        thieves.keys[len(thieves.keys)] = PrivateKey(crypto_sign_ed25519_sk_to_curve25519(sk))
    assert len(thieves.keys) == 5
    for e in sealed:
        with pytest.raises(RemoteError, match="no_prekey"):
            open_sealed(e.body, thieves, seal_ad(e.consortium_id, e.sender, e.round))


def test_a_killed_node_gets_the_shares_published_while_it_was_down(tmp_path):
    out = tmp_path / "net"
    # Down for 8 s (the others' round deadline is 20 s): the shares and reports the others
    # publish in the seconds after the kill fall more than 1 s before the restart even on
    # a loaded machine (with 4 s, a slow round 4 at the others once left nothing queued).
    net, stdout = simulate_mqtt(out, "--kill", "telco-2@3", "--restart-after", "8")
    assert "SIGKILL telco-2" in stdout and "restarted telco-2" in stdout
    procs = net["processes"]
    assert procs["telco-2"]["starts"] == 2 and procs["telco-2"]["exit_codes"][-1] == 0
    assert all(net["rounds_done"][n] == 10 for n in procs if n != "telco-2")
    # telco-2 finished; it may have joined the others past a round they closed while it
    # was down (the majority rule), rather than re-run that round alone.
    assert net["rounds_done"]["telco-2"] >= 9
    # A restarted node may re-send the release it stored before the kill: the
    # others already hold it, and count the copy as a benign duplicate.
    # (and its late echoes for rounds the others closed while it was down: late_echo)
    assert set(net["rejected"]) <= BENIGN_REASONS
    log = (out / "logs" / "telco-2.log").read_text()
    hms = re.findall(r"--- start 2 at (\d\d:\d\d:\d\d) ---", log)[0]
    today = datetime.date.today()
    restarted = datetime.datetime.combine(today, datetime.time.fromisoformat(hms)).timestamp()
    audit = [json.loads(x) for x in (out / "state" / "telco-2" / "audit.jsonl").read_text()
             .splitlines()]
    # When a share was published: when another member accepted the same digest.
    first_seen: dict[str, float] = {}
    for name in procs:
        if name != "telco-2":
            for a in read_jsonl(out / "state" / name / "audit.jsonl"):
                if a["outcome"] == "accepted":
                    first_seen[a["digest"]] = min(a["time"], first_seen.get(a["digest"], a["time"]))
    queued = [a for a in audit if a["outcome"] == "accepted" and a["time"] >= restarted and
              first_seen.get(a["digest"], restarted) < restarted - 1]
    # Shares the others released (and published) while telco-2 was down, which
    # the broker kept in telco-2's session and handed to the new process.
    assert queued, audit
    # Its first round after the restart (where it resumed, or the round it joined) has
    # every share: those that had reached the killed process were not acknowledged yet
    # (the round was not checkpointed), so the broker delivered them again; and the
    # others, hearing its hello, waited for it again.
    lines = [json.loads(x) for x in (out / "state" / "telco-2" / "metrics.jsonl").read_text()
             .splitlines()]
    first = int(re.findall(r"starting at round (\d+)/10", log)[1]) - 1
    resumed = [ln for ln in lines if ln["round"] >= first and "received" in ln][0]
    assert lines[-1]["round"] == 9
    assert resumed["received"] == ["telco-0", "telco-1", "telco-3"], resumed
