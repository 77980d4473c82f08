"""A dealing's commitment, the check's challenge, and the settlement of disputes by the
dealer-signed deal a holder reveals (issue 22): the parts of a secure round that bind a
dealer to its pieces. node/runtime/secure_round.py `SecureRound` uses them (`settle` at the
sum step, once the agreements are compared); docs/privacy-secure.md "What is wired" argues it."""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import blake2b
from typing import TYPE_CHECKING

from gossip.bodies import SecAgg
from node.secagg import robust
from node.secagg.errors import SecAggError
from node.secagg.pieces import MASK, SEED, VECTOR, from_bytes

if TYPE_CHECKING:
    from node.runtime.secure_round import SecureRound

COMMIT_BYTES = 32  # one BLAKE2b-256 digest per holder in a dealing's commitment


def piece_digest(vector: bytes, mask: bytes) -> bytes:
    """What a dealing's commitment holds for one holder: BLAKE2b-256 of the two pieces' bytes
    as sent (a SEED piece's bytes for a seeded holder)."""
    return blake2b(len(vector).to_bytes(8, "little") + vector + mask, digest_size=COMMIT_BYTES,
                   person=b"flnode-sa-piece").digest()


def challenge(consortium_id: bytes, r: int, dealer: int, commitment: bytes) -> bytes:
    """The check's challenge for one dealing: a hash of its commitment (every holder's piece
    digest), so it is fixed only once the dealer has bound itself to every piece
    (Fiat-Shamir). A dealer that sends holders different commitments makes their checks
    use different challenges: its dealing then fails the check."""
    return blake2b(consortium_id + r.to_bytes(8, "little") + dealer.to_bytes(4, "little")
                   + commitment, digest_size=32, person=b"flnode-sa-chal").digest()


def settle(sr: SecureRound, reveals: Mapping[tuple[int, int], SecAgg | str], same: set[int]) -> None:
    """Each dispute settled by the dealer-signed deal its holder revealed (verified by
    the driver: the dealer's signature, the sealed body's committed key): the piece
    gives the check value the other holders agree on (the holder lied: `false_dispute`)
    or not (the dealer sent a bad piece: `bad_dealing`, proven by its signature); a
    reveal that does not verify is the holder's (`bad_reveal`). A holder whose agreement matches ours
    (`same`: it saw the same checks, so the same disputes) and that revealed nothing is
    `dispute_unbacked`; one whose view differs may not know it is in dispute."""
    for (i, j), kinds in sorted(sr.disputes.items()):
        if j == sr.i:
            continue  # ours: we revealed it
        dealer, holder = sr.members[i - 1], sr.members[j - 1]
        got = reveals.get((j, i))
        if isinstance(got, str):
            sr.out.named[holder] = f"bad_reveal: {got}"
            sr.out.disagreed[holder] = (holder,)
            continue
        if got is None:
            if j in same:
                sr.out.named[holder] = (f"dispute_unbacked: it disputes {dealer}'s dealing "
                                          "and revealed no piece that dealer signed")
            continue
        fault, why = judge_reveal(sr, i, j, kinds, got)
        if fault == "holder":  # not the deal the dealer signed for it: its choice (F2)
            sr.out.named[holder] = f"bad_reveal: {why}"
            sr.out.disagreed[holder] = (holder,)
            continue
        for x in (holder, dealer):  # the revealing agreement is the evidence
            sr.out.disagreed[x] = (*sr.out.disagreed.get(x, ()), holder)
        if why is None:
            sr.out.named[holder] = (f"false_dispute: the piece {dealer} signed for it "
                                      "gives the check value the other holders agree on "
                                      "(its own check was wrong; proof: the revealed deal)")
        else:
            if sr.out.named.get(holder, "").startswith("dispute:"):
                del sr.out.named[holder]  # the holder told the truth
            proof = f"bad_dealing: {why} (proof: the deal it signed for {holder}, " \
                    f"revealed by {holder})"
            before = sr.out.named.get(dealer)  # e.g. split_view: both are kept
            sr.out.named[dealer] = proof if before is None else f"{before}; also {proof}"


def judge_reveal(sr: SecureRound, i: int, j: int, kinds: Mapping[int, int], msg: SecAgg
                 ) -> tuple[str, str | None]:
    """Who is at fault in dealer i's signed deal revealed by holder j: ("dealer", None) if
    the deal is right (the holder lied: `false_dispute`), ("dealer", why) if the dealer
    signed a bad piece or two commitments, ("holder", why) if it is not the deal the dealer
    signed for holder j. An honest holder never holds a deal whose pieces miss its slot of
    the commitment or are keyed for another holder (`file_deal` refuses it at receipt,
    naming the dealer), so revealing one is the holder's choice (review 2 F2: a colluder
    revealed the honest dealer's deal for its accomplice)."""
    p = sr.params
    if msg.step != "deal" or len(msg.pieces) != 3 or len(msg.pieces[2]) != COMMIT_BYTES * p.members:
        return "holder", "its revealed deal is not a deal"
    commitment = msg.pieces[2]
    ours = sr.commitments.get(i)
    if ours is not None and ours != commitment:  # two commitments, both signed by the dealer
        return "dealer", "it committed to different pieces in different members' deals"
    if commitment[COMMIT_BYTES * (j - 1):COMMIT_BYTES * j] != piece_digest(*msg.pieces[:2]):
        return "holder", "the revealed pieces are not the ones the dealer committed to for it"
    try:
        vec = from_bytes(msg.pieces[0], sender=i)
        mask = from_bytes(msg.pieces[1], expected_count=p.opened + 1, expected_kind=MASK,
                          sender=i)
        if vec.kind == SEED:
            vec = robust.expand_seed_piece(p, vec)
        if (vec.round, vec.kind, vec.owner, vec.holder) != (sr.r, VECTOR, i, j) or \
                vec.values.size != p.width or mask.key != (sr.r, MASK, i, j):
            return "holder", "the revealed pieces are keyed for another round, dealer or holder"
    except SecAggError as exc:
        return "holder", f"the revealed pieces are malformed ({exc}): it would have refused them"
    chal = challenge(sr.consortium_id, sr.r, i, commitment)
    for kind, expected in sorted(kinds.items()):
        piece = vec if kind == VECTOR else mask
        if robust.resolve_dispute(p, chal, piece, expected) == "dealer":
            return "dealer", (f"its signed {'vector' if kind == VECTOR else 'mask'} piece does "
                              "not give the check value its other holders' pieces agree on")
    return "dealer", None


__all__ = ["COMMIT_BYTES", "challenge", "judge_reveal", "piece_digest", "settle"]
