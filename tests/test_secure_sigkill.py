"""Issue 22, "a SIGKILL loses nothing", with real OS processes: a secure consortium of four
`flnode run` processes (t = 1, the optimistic sum opening: each member's sum piece goes to
its two ring neighbours, then confirm and fallback) gossiping through a real mosquitto
(persistent sessions: what is sent to a member while it is down waits for it at the
broker; what it acked before the kill is its own to keep). site-1 is SIGKILLed mid-round
after it received every deal, sent its sum piece, received its ring's sum pieces and said
"ok" (its confirm stored), and restarted on the same state dir.

The kill point is made certain by state files, not sleeps: once site-1's sum message is
in its outbox, site-3 (outside site-1's ring: its sum piece never goes to site-1) is
SIGSTOPped, so site-1 cannot close the round (it waits for site-3's fallback, which
needs site-1's confirm) and is killed once its confirm is in its outbox; site-3 is
SIGCONTinued after the kill. Before the restart a forged received file is planted: a
genuine signed sum message (site-1's own, from its outbox) stored under site-3's name as
its fallback: refused by name, the rest used.

Before node/runtime/secure_deals.py `refeed` and `keep_step` the restarted member's
share phase waited out its deadline (the reloaded deals were never given to the round
machine), the steps' messages it had acked were gone, and its round failed or abstained.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from gossip.envelope import BENIGN_REASONS
from node.runtime.state import read_jsonl
from tests.mqtt_support import require_mosquitto

ROOT = Path(__file__).resolve().parent.parent
VICTIM, FAR, RING = "site-1", "site-3", ("site-0", "site-2")  # sorted names, t = 1
# Each wait below ends on a state file or a process exit; this is the bound that turns a
# hang into a failure (a phase deadline is 30 s: nothing in the passing run waits for one).
WAIT_S = 90.0
ROUNDS = 2
POLL_S = 0.005  # the sum -> SIGSTOP step races the round's last exchanges: poll often


def _wait(what: str, done, procs=()) -> None:
    end = time.monotonic() + WAIT_S
    while not done():
        for m in procs:
            if m.proc is not None and m.proc.poll() is not None:
                raise AssertionError(f"{m.name} exited ({m.proc.returncode}) while waiting "
                                     f"for {what}: {m.log.read_text()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {WAIT_S:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def _aggregates(state: Path) -> list[dict]:
    return [a for a in read_jsonl(state / "audit.jsonl") if a.get("kind") == "aggregate"]


def _run(out: Path, privacy: list[str]):
    """The run (module docstring); returns (members, run dir)."""
    require_mosquitto()
    sys.path.insert(0, str(ROOT / "scripts"))
    import simulate_network as sn
    from rich.console import Console

    from node.rehearsal.simulation.prepare import member_names, prepare
    from node.rehearsal.simulation.scenario import spec_from_args
    from scripts.ports import free_ports

    scenario = out.parent / "secure.toml"
    scenario.write_text('secure = true\ntransport = "mqtt"\n')
    rounds = [] if "record" in privacy else ["--rounds", str(ROUNDS)]  # DP: the plan's
    args = sn.parse_args(["--scenario", str(scenario), "--nodes", "4", *rounds,
                          "--dataset", "digits", "--seed", "0", "--out", str(out),
                          "--round-deadline", "30", *privacy])
    spec = spec_from_args(args, network=True)
    names = member_names(spec)
    ports = free_ports(1)
    prep = prepare(spec, {n: {"mqtt": f"mqtt://127.0.0.1:{ports[0]}"} for n in names})
    broker, _ = sn.setup_mqtt(args, prep, ports[0], Console(quiet=True))
    # Two rounds (with DP the plan chose more): the kill is in the first; the others are in
    # the second when the killed member comes back (a run's last round would leave nobody
    # to answer its prekey hello: it waits a deadline for prekeys it does not need).
    for path in prep.config_paths:
        cfg = tomllib.loads(path.read_text())
        cfg["training"]["rounds"] = ROUNDS
        path.write_text(tomli_w.dumps(cfg))
    (out / "logs").mkdir(exist_ok=True)
    members = {n: sn.Member(n, c, out / "state" / n, out / "logs" / f"{n}.log")
               for n, c in zip(prep.names, prep.config_paths, strict=True)}
    victim, far = members[VICTIM], members[FAR]
    outbox = victim.state / "outbox"
    received = victim.state / "received"
    stopped = False
    try:
        for m in members.values():
            m.start()
        _wait(f"{VICTIM}'s sum message in its outbox",
              lambda: any(outbox.glob("round-00000000.sum")), members.values())
        os.kill(far.proc.pid, signal.SIGSTOP)
        stopped = True
        _wait(f"{VICTIM}'s confirm in its outbox (its ring's sum pieces came)",
              lambda: any(outbox.glob("round-00000000.confirm")), [victim])
        assert not _aggregates(victim.state), "the round closed before the kill"
        victim.proc.kill()
        assert victim.proc.wait() == -signal.SIGKILL
        victim.exit_codes.append(-signal.SIGKILL)
        os.kill(far.proc.pid, signal.SIGCONT)
        stopped = False
        kept = sorted(p.name for p in received.iterdir())
        # forged: a genuine signed sum message (the victim's own), filed as site-3's fallback
        (received / f"round-00000000.{FAR}.fallback.step").write_bytes(
            (outbox / "round-00000000.sum").read_bytes())
        restarted = time.time()
        victim.start()
        _wait("every member to finish its run",
              lambda: all(m.proc.poll() is not None for m in members.values()))
    finally:
        if stopped:
            os.kill(far.proc.pid, signal.SIGCONT)
        for m in members.values():
            m.stop()
            if m.proc is not None and m.proc.returncode is not None:
                m.exit_codes.append(m.proc.returncode)
        broker.stop()
    return members, kept, restarted


def _check(members, kept, restarted: float) -> None:
    victim = members[VICTIM]
    assert victim.exit_codes == [-signal.SIGKILL, 0], victim.log.read_text()[-3000:]
    assert all(m.exit_codes == [0] for n, m in members.items() if n != VICTIM)
    # what the killed member had received and stored: every deal, its ring's sum pieces
    for n in (*RING, FAR):
        assert f"round-00000000.{n}.deal" in kept, kept
    # the round completed at every member, the restarted one included, on one aggregate
    used, digests = set(), set()
    for name, m in members.items():
        agg, _ = _aggregates(m.state)
        sec = agg["secure"]
        assert agg["round"] == 0 and sec["ok"], (name, sec)
        assert not sec["detail"].startswith("lost_pieces"), (name, sec)
        assert sec["named"] == {} and sec["missed_opening"] == [], (name, sec)
        assert sec["entered"] == sorted(members), (name, sec)
        used.add(tuple(agg["used"]))
        digests.add(json.loads((m.state / "final.json").read_text())["digest"])
    assert used == {tuple(sorted(members))} and len(digests) == 1, (used, digests)
    # the restarted member's share phase closed on its reloaded deals, not at its deadline
    agg, last = _aggregates(victim.state)
    assert agg["time"] - restarted < 30, agg["time"] - restarted
    assert last["round"] == 1 and last["secure"]["ok"], last
    # its ring's sum pieces were stored as they came; the forged file: refused by name, the
    # node ran on
    for n in RING:
        assert f"round-00000000.{n}.sum.step" in kept, kept
    log = victim.log.read_text()
    refused = [ln for ln in log.splitlines() if "refusing the stored fallback message" in ln]
    assert len(refused) == 1 and f"round-00000000.{FAR}.fallback.step (from {FAR})" in \
        refused[0] and f"not signed by {FAR}'s key" in refused[0], refused
    # refused: the forged file only (the others' re-sent copies of our steps are benign
    # duplicates; a copy redelivered to us after the restart is not filed twice)
    for name, m in members.items():
        rejected = read_jsonl(m.state / "metrics.jsonl")[-1]["rejected"]
        real = {k: v for k, v in rejected.items() if k not in BENIGN_REASONS}
        assert real == ({"stored_step": 1} if name == VICTIM else {}), (name, rejected)
    # closed: the round's received files are pruned (the set-aside forged one too)
    assert not list((victim.state / "received").iterdir())


@pytest.mark.slow  # four processes, a kill and a restart: 13-28 s on the loaded 2-core box
def test_a_sigkilled_secure_member_restarts_and_the_round_completes_with_it(tmp_path):
    _check(*_run(tmp_path / "run", ["--privacy", "off"]))


@pytest.mark.slow  # the same with DP on the sum: 16-34 s
def test_with_dp_a_sigkilled_secure_member_charges_its_round_exactly_once(tmp_path):
    """As above, DP on the sum (privacy.mode "record"): the restarted member's ledger holds
    round 1's charge once (written before its first deal left, not again at the restart)
    and its epsilon, recomputed by the accountant from the ledger, is every member's."""
    from node.privacy.ledger import Ledger

    members, kept, restarted = _run(tmp_path / "run", ["--privacy", "record", "--epsilon", "3"])
    _check(members, kept, restarted)
    records = {n: read_jsonl(m.state / "ledger.jsonl") for n, m in members.items()}
    assert sorted(x["round"] for x in records[VICTIM]) == [0, 1], records[VICTIM]
    eps = {n: Ledger(m.state / "ledger.jsonl").epsilon(1e-5) for n, m in members.items()}
    assert len(set(eps.values())) == 1 and 0 < eps[VICTIM] < 3, eps
    line = read_jsonl(members[VICTIM].state / "metrics.jsonl")[-1]
    assert line["epsilon"] == pytest.approx(eps[VICTIM], rel=1e-9), (line["epsilon"], eps)
