"""Each verification step of the wire format has its own reason; nothing else escapes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import bodies, envelope
from gossip.envelope import REPLAY_WINDOW, decode_outer
from gossip.errors import RemoteError
from tests.helpers import SPEC, consortium, keys, share_bytes, tensors, verifier_for

K = keys(4)  # K[0] is us; K[1], K[2] are members; K[3] is an outsider
CONS = consortium(K[:3])


def reason(data: bytes, v=None, current_round: int = 0) -> str:
    v = v or verifier_for(CONS, K[0])
    with pytest.raises(RemoteError) as info:
        v.verify(data, current_round)
    return info.value.reason


def test_valid_share_roundtrips_with_sender_weight_and_values():
    acc = verifier_for(CONS, K[0]).verify(share_bytes(K[1], CONS, round_=3, seq=7), 0)
    assert acc.sender == "bank-1" and acc.round == 3 and acc.envelope.seq == 7
    assert acc.share.weight == 100.0
    np.testing.assert_array_equal(acc.share.tensors["w"], tensors()[0][1])


def test_flipped_signature_bit_is_bad_signature():
    data = bytearray(share_bytes(K[1], CONS))
    data[-1] ^= 0x01  # the signature is the last field
    assert reason(bytes(data)) == "bad_signature"


def test_flipped_body_bit_is_bad_signature():
    good = share_bytes(K[1], CONS)
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0x10  # inside the tensor bytes
    assert reason(bytes(raw)) in {"bad_signature", "malformed"}


def test_non_member_key_is_refused():
    assert reason(share_bytes(K[3], CONS)) == "non_member"


def test_another_consortium_is_refused_with_schema_hint():
    other = consortium(K[:3], name="other-consortium")
    v = verifier_for(CONS, K[0])
    with pytest.raises(RemoteError) as info:
        v.verify(share_bytes(K[1], other), 0)
    assert info.value.reason == "consortium"
    assert "schemas differ" in str(info.value)


def test_truncated_envelope_is_malformed():
    data = share_bytes(K[1], CONS)
    for cut in (0, 1, 10, len(data) // 2, len(data) - 1):
        assert reason(data[:cut]) == "malformed"


def test_trailing_garbage_is_malformed():
    assert reason(share_bytes(K[1], CONS) + b"\x00") == "malformed"


def test_oversized_envelope_is_refused_before_decoding():
    v = verifier_for(CONS, K[0])
    v.max_bytes = 1000
    assert reason(share_bytes(K[1], CONS) + b"x" * 1000, v) == "too_large"


def test_duplicate_is_benign_and_distinct_from_replay():
    v = verifier_for(CONS, K[0])
    data = share_bytes(K[1], CONS, seq=1)
    v.verify(data, 0)
    assert reason(data, v) == "duplicate"
    assert "duplicate" in envelope.BENIGN_REASONS


def test_replay_older_than_the_window_is_refused():
    v = verifier_for(CONS, K[0])
    old = share_bytes(K[1], CONS, round_=0, seq=0)
    v.verify(old, 0)
    v.verify(share_bytes(K[1], CONS, round_=0, seq=REPLAY_WINDOW + 5), 0)
    assert reason(old, v) == "replay"
    # and a never-seen seq that old is a replay too, not a fresh share
    assert reason(share_bytes(K[1], CONS, seq=2), v) == "replay"


def test_replay_state_survives_export_and_load():
    v = verifier_for(CONS, K[0])
    data = share_bytes(K[1], CONS, seq=4)
    v.verify(data, 0)
    w = verifier_for(CONS, K[0])
    w.load_state(v.export_state())
    assert reason(data, w) == "duplicate"


def test_seq_reused_for_other_content_is_refused():
    v = verifier_for(CONS, K[0])
    v.verify(share_bytes(K[1], CONS, seq=3), 0)
    other = share_bytes(K[1], CONS, seq=3, body=bodies.encode_share(tensors(0.7), 100.0))
    assert reason(other, v) == "seq_reuse"


def test_share_for_a_closed_round_is_stale():
    assert reason(share_bytes(K[1], CONS, round_=2), current_round=3) == "stale"


def test_own_key_coming_back_is_refused():
    assert reason(share_bytes(K[0], CONS)) == "from_self"


def test_wrong_shape_is_refused():
    body = bodies.encode_share([("w", np.zeros((4, 2), "<f4")), ("b", np.zeros(2, "<f4"))], 1.0)
    assert reason(share_bytes(K[1], CONS, body=body)) == "shape"


def test_missing_tensor_is_refused_as_shape():
    body = bodies.encode_share([("w", np.zeros((2, 4), "<f4"))], 1.0)
    assert reason(share_bytes(K[1], CONS, body=body)) == "shape"


def test_wrong_dtype_is_refused():
    body = bodies.encode_share([("w", np.zeros((2, 4), "<f2")), ("b", np.zeros(2, "<f2"))], 1.0)
    assert reason(share_bytes(K[1], CONS, body=body)) == "dtype"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    w = np.zeros((2, 4), "<f4")
    w[1, 2] = bad
    body = bodies.encode_share([("w", w), ("b", np.zeros(2, "<f4"))], 1.0)
    assert reason(share_bytes(K[1], CONS, body=body)) == "non_finite"


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), 1e13, "10", None])
def test_bad_weight_is_refused(weight):
    body = msgpack.packb({"weight": weight, "tensors": [
        [n, "<f4", list(a.shape), a.tobytes()] for n, a in tensors()]})
    assert reason(share_bytes(K[1], CONS, body=body)) == "bad_body"


def test_body_that_is_not_msgpack_is_bad_body():
    assert reason(share_bytes(K[1], CONS, body=b"\xc1\xc1 not msgpack")) == "bad_body"


def test_pickle_in_a_body_is_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    assert reason(share_bytes(K[1], CONS, body=pickle.dumps(Evil()))) == "bad_body"
    assert not marker.exists()


def test_wrong_protocol_tag_is_refused():
    env = decode_outer(share_bytes(K[1], CONS))
    data = msgpack.packb(["flnode/0", env.consortium_id, env.sender, env.kind, env.round,
                          env.seq, env.body, env.sig])
    assert reason(data) == "protocol"


def test_unknown_kind_is_refused():
    env = decode_outer(share_bytes(K[1], CONS))
    data = msgpack.packb(["flnode/1", env.consortium_id, env.sender, "gimme", env.round,
                          env.seq, env.body, env.sig])
    assert reason(data) == "kind"


def test_rejected_share_leaves_replay_table_untouched():
    """A bad share with a fresh seq must not burn that seq for a good one."""
    v = verifier_for(CONS, K[0])
    w = np.zeros((2, 4), "<f4")
    w[0, 0] = np.nan
    bad = share_bytes(K[1], CONS, seq=9,
                      body=bodies.encode_share([("w", w), ("b", np.zeros(2, "<f4"))], 1.0))
    assert reason(bad, v) == "non_finite"
    assert v.export_state() == {}


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_anything_but_remote_error(data):
    v = verifier_for(CONS, K[0])
    with pytest.raises(RemoteError):
        v.verify(data, 0)


@settings(max_examples=2000, deadline=None)
@given(st.data())
def test_mutated_valid_envelopes_are_rejected_with_a_reason(data):
    good = share_bytes(K[1], CONS, round_=1, seq=2)
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    v = verifier_for(CONS, K[0])
    if bytes(raw) == good:
        assert v.verify(bytes(raw), 0).sender == "bank-1"
        return
    with pytest.raises(RemoteError) as info:
        v.verify(bytes(raw), 0)
    assert info.value.reason in {"malformed", "protocol", "kind", "consortium", "non_member",
                                 "from_self", "bad_signature", "too_large"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=10,
                max_size=10), st.floats(min_value=1e-6, max_value=1e9))
def test_encode_decode_roundtrip_is_exact(values, weight):
    w = np.array(values[:8], dtype="<f4").reshape(2, 4)
    b = np.array(values[8:], dtype="<f4")
    share = bodies.decode_share(bodies.encode_share([("w", w), ("b", b)], weight), SPEC)
    np.testing.assert_array_equal(share.tensors["w"], w)
    np.testing.assert_array_equal(share.tensors["b"], b)
    assert share.weight == weight


@given(st.binary(max_size=70_000), st.integers(min_value=0, max_value=70_000))
@settings(max_examples=60, deadline=None)
def test_a_body_given_in_parts_packs_to_exactly_the_msgpack_of_the_whole(body, cut):
    """pack() writes the outer array itself (to avoid copying a sealed body); it must be
    byte for byte what msgpack.packb gives, for every bin size class."""
    k = keys(1)[0]
    whole = envelope.pack(k, b"\x02" * 32, "share", 3, 2**40, body)
    env = decode_outer(whole)
    assert whole == msgpack.packb(["flnode/1", b"\x02" * 32, bytes(k.verify_key), "share", 3,
                                   2**40, body, env.sig], use_bin_type=True)
    assert envelope.pack(k, b"\x02" * 32, "share", 3, 2**40, [body[:cut], body[cut:]]) == whole


# --- the field-by-field parser reads exactly what msgpack writes --------------------

@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(envelope.KINDS)), st.integers(0, 2**53 - 1),
       st.integers(0, 2**53 - 1), st.binary(max_size=70_000), st.binary(min_size=32, max_size=32))
def test_decode_outer_reads_every_envelope_msgpack_writes(kind, round_, seq, body, cid):
    """Every uint width and bin 8/16/32 as msgpack.packb writes them."""
    fields = ["flnode/1", cid, b"\x07" * 32, kind, round_, seq, body, b"\x08" * 64]
    env = decode_outer(msgpack.packb(fields, use_bin_type=True))
    assert [PROTO_, env.consortium_id, env.sender, env.kind, env.round, env.seq, env.body,
            env.sig] == fields and type(env.body) is bytes


PROTO_ = "flnode/1"
_names = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 256)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_names, st.lists(st.integers(0, 4), min_size=1, max_size=4),
                          st.sampled_from(["<f4", "<f2"])),
                min_size=1, max_size=4, unique_by=lambda t: t[0]),
       st.floats(min_value=1e-6, max_value=1e12), st.booleans())
def test_decode_share_reads_every_share_encode_share_writes(specs, weight, tensors_first):
    spec = [bodies.TensorSpec(n, tuple(s), d) for n, s, d in specs]
    rng = np.random.default_rng(0)
    arrays = [(t.name, rng.standard_normal(t.shape).astype(t.dtype)) for t in spec]
    body = bodies.encode_share(arrays, weight)
    if tensors_first:  # the same map, keys the other way round (a peer may write that)
        doc = msgpack.unpackb(body)
        body = msgpack.packb({"tensors": doc["tensors"], "weight": doc["weight"]},
                             use_bin_type=True)
    share = bodies.decode_share(body, spec)
    assert share.weight == weight
    for name, a in arrays:
        np.testing.assert_array_equal(share.tensors[name], a)
        assert share.tensors[name].dtype == a.dtype and not share.tensors[name].flags.writeable


def test_the_envelope_docstring_names_every_kind():
    """The wire format's page lists every kind a node accepts (auditors read it)."""
    for kind in envelope.KINDS:
        assert f'"{kind}"' in envelope.__doc__, kind
