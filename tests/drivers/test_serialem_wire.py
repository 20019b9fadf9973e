"""The SerialEM codec against the frames captured in docs/serialem-socket-protocol.md.

Captured frames are copied from the document as hex; ``x`` marks padding of no meaning, which
our encoder fills with zeros and our decoder must ignore (it is fed 0xAA there).
"""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.errors import ConnectionLost, DeviceTimeout, ProtocolError
from drivers.serialem import framing as fr
from drivers.serialem import wire as w

# --------------------------------------------------------------------------- captured frames


def captured(text: str) -> tuple[bytes, bytes, bytes]:
    """(bytes with padding 0x00, bytes with padding 0xAA, mask 0xFF where bytes matter)."""
    h = "".join(text.split())
    zero = bytes.fromhex(h.replace("x", "0"))
    junk = bytes.fromhex(h.replace("x", "a"))
    mask = bytes(0 if h[2 * i] == "x" else 0xFF for i in range(len(h) // 2))
    return zero, junk, mask


def masked(data: bytes, mask: bytes) -> bytes:
    return bytes(a & m for a, m in zip(data, mask, strict=True))


NAV_PATH = "C:\\data\\nav.nav"

CAPTURED_REQUESTS: dict[str, tuple[str, w.Request]] = {
    "ok_to_run": ("08000000 03000000", w.OkToRunRequest()),
    "move_stage_to_10_20": (
        ("44000000 01000000 1e010000 02000000 0c000000"
         "00000000 00000000 00000000"
         "0000000000000000 0000000000002440 0000000000003440"
         "00 31302e00 32302e00 00 xxxx"),
        w.RegularRequest(286, (w.WireArg("10.", 10.0), w.WireArg("20.", 20.0)))),
    "report_stage_xyz": ("18000000 01000000 25010000 00000000 01000000 00xxxxxx",
                         w.RegularRequest(293)),
}

CAPTURED_REPLIES: dict[str, tuple[w.Function, str, w.Reply]] = {
    "ok_to_run": (w.Function.OK_TO_RUN, "0c000000 00000000 01000000", w.OkToRunReply(True)),
    "move_stage_to": (w.Function.REGULAR,
                      "18000000 00000000 ffffffff 00000000 01000000 00xxxxxx",
                      w.RegularReply(0, ())),
    "report_stage_xyz": (
        w.Function.REGULAR,
        ("3c000000 00000000 02000000 00000000 0a000000"
         "00000000 00000000 00000000 0000000000002440 0000000000003440 00000000000016c0 00xxxxxx"),
        w.RegularReply(0, (10.0, 20.0, -5.5))),
    # the document elides the string bytes ("433a5c...766100"); they are C:\data\nav.nav\0
    "string_reply": (
        w.Function.REGULAR,
        "34000000 00000000 00000000 00000000 08000000 01000000 0000000000000000"
        + NAV_PATH.encode().hex() + "00" + "00" + "xxxxxx",
        w.RegularReply(0, (NAV_PATH,))),
}

# Layouts the document gives in words rather than hex (sections 2 and 5).
LAYOUT_FRAMES: dict[str, tuple[w.Request, bytes]] = {
    "handshake": (w.HandshakeRequest(), struct.pack("<2i", 8, 2)),
    "get_image_b_fft": (w.GetImageRequest(1, True), struct.pack("<4i", 16, 4, 1, 1)),
    "put_image": (w.PutImageRequest(1, 64, 32, 4096, 0, 2, 1, -1, 1),
                  struct.pack("<11i", 44, 5, 1, 64, 32, 4096, 0, 2, 1, -1, 1)),
}


@pytest.mark.parametrize("name", list(CAPTURED_REQUESTS))
def test_request_encodes_to_captured_bytes(name: str) -> None:
    text, request = CAPTURED_REQUESTS[name]
    zero, _, mask = captured(text)
    got = w.encode_request(request)
    assert len(got) == len(zero)
    assert masked(got, mask) == masked(zero, mask)


@pytest.mark.parametrize("name", list(CAPTURED_REQUESTS))
def test_captured_request_decodes_whatever_the_padding(name: str) -> None:
    text, request = CAPTURED_REQUESTS[name]
    _, junk, _ = captured(text)
    assert w.decode_request(junk) == request


@pytest.mark.parametrize("name", list(CAPTURED_REPLIES))
def test_reply_encodes_to_captured_bytes(name: str) -> None:
    _, text, reply = CAPTURED_REPLIES[name]
    zero, _, mask = captured(text)
    got = w.encode_reply(reply)
    assert len(got) == len(zero)
    assert masked(got, mask) == masked(zero, mask)


@pytest.mark.parametrize("name", list(CAPTURED_REPLIES))
def test_captured_reply_decodes_whatever_the_padding(name: str) -> None:
    function, text, reply = CAPTURED_REPLIES[name]
    _, junk, _ = captured(text)
    assert w.decode_reply(function, junk) == reply


@pytest.mark.parametrize("name", list(LAYOUT_FRAMES))
def test_layout_frames(name: str) -> None:
    request, frame = LAYOUT_FRAMES[name]
    assert w.encode_request(request) == frame
    assert w.decode_request(frame) == request


def test_image_reply_and_acks() -> None:
    info = w.ImageInfo(mode=1, row_bytes=128, width=64, height=32, num_bytes=4096, num_chunks=1)
    frame = struct.pack("<8i", 32, 0, 1, 128, 64, 32, 4096, 1)
    assert w.encode_reply(info) == frame
    assert w.decode_reply(w.Function.GET_IMAGE, frame) == info
    assert w.encode_reply(w.PutImageAck()) == struct.pack("<2i", 8, 0)
    assert w.decode_reply(w.Function.PUT_IMAGE, struct.pack("<2i", 8, 0)) == w.PutImageAck()


@pytest.mark.parametrize("code", [-1, -2, -3, -4, -5, -6, -9, -10])
def test_error_codes_are_eight_byte_replies(code: int) -> None:
    frame = w.encode_error(code)
    assert frame == struct.pack("<2i", 8, code)
    for function in (w.Function.REGULAR, w.Function.OK_TO_RUN, w.Function.GET_IMAGE,
                     w.Function.PUT_IMAGE):
        assert w.decode_reply(function, frame) == w.ErrorReply(code)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(("value", "text"), [
    (10.0, "10."), (0.125, "0.125"), (-5.5, "-5.5"), (0.0, "0."), (-0.0, "-0."),
    (1e-7, "0."), (1 / 3, "0.333333"), (123456789.0, "123456789."), (2.5e-6, "0.000003"),
    (1e20, "100000000000000000000."),
])
def test_format_double_is_percent_f_without_trailing_zeros(value: float, text: str) -> None:
    assert w.format_double(value) == text


@pytest.mark.parametrize(("value", "text"), [(0, "0"), (-3, "-3"), (2**31 - 1, "2147483647")])
def test_format_int(value: int, text: str) -> None:
    assert w.format_int(value) == text


@pytest.mark.parametrize(("text", "value"), [
    ("10", 10.0), ("  -3.5e2xyz", -350.0), ("abc", 0.0), ("1e", 1.0), (".5", 0.5),
    ("", 0.0), ("0x1A", 26.0), ("C:\\x", 0.0),
])
def test_c_atof(text: str, value: float) -> None:
    assert w.c_atof(text) == value


@pytest.mark.parametrize("texts", [
    (), ("",), ("a",), ("ab", "cde"), ("abc",), ("abcd", "", "e"), ("x" * 7,) * 5,
])
def test_request_array_word_count_formula(texts: tuple[str, ...]) -> None:
    args = tuple(w.WireArg(t, 1.0) for t in texts)
    array = w.request_array(args)
    if not args:
        assert array == b"\0\0\0\0"
        return
    before_nul = 12 * (len(args) + 1) + 1 + sum(len(t) + 1 for t in texts)
    assert len(array) == 4 * ((before_nul + 5) // 4)
    assert array[before_nul] == 0


# --------------------------------------------------------------------------- limits


def test_limits_refused_before_sending() -> None:
    with pytest.raises(w.WireLimitExceeded):
        w.encode_request(w.RegularRequest(1, tuple(w.WireArg("1", 1.0) for _ in range(20))))
    with pytest.raises(w.WireLimitExceeded):
        w.encode_request(w.RegularRequest(1, (w.WireArg("x" * 1000, 0.0),)))
    with pytest.raises(w.WireLimitExceeded):
        w.encode_reply(w.RegularReply(0, (1.0,) * 7))
    with pytest.raises(w.WireLimitExceeded):
        w.encode_request(w.RegularRequest(1, (w.WireArg("a\0b", 0.0),)))
    with pytest.raises(w.WireLimitExceeded):
        w.encode_request(w.GetImageRequest(20))
    with pytest.raises(w.WireLimitExceeded):
        w.encode_request(w.GetImageRequest(8, fft=True))
    biggest = w.encode_request(w.RegularRequest(1, (w.WireArg("x" * 900, 0.0),)))
    assert len(biggest) <= w.MAX_REQUEST_BYTES


# --------------------------------------------------------------------------- round trips

_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"),
                max_size=12)
_finite = st.floats(allow_nan=False, allow_infinity=True, width=64)
_i32 = st.integers(-(2**31), 2**31 - 1)
_wire_arg = st.builds(w.WireArg, _text, _finite, _i32)


@settings(max_examples=150, deadline=None)
@given(index=st.integers(0, 2000), args=st.lists(_wire_arg, max_size=w.MAX_ARGS))
def test_regular_request_round_trip(index: int, args: list[w.WireArg]) -> None:
    request = w.RegularRequest(index, tuple(args))
    try:
        frame = w.encode_request(request)
    except w.WireLimitExceeded:
        assert len(w.request_array(request.args)) + 20 > w.MAX_REQUEST_BYTES
        return
    assert struct.unpack_from("<i", frame)[0] == len(frame) <= w.MAX_REQUEST_BYTES
    assert w.decode_request(frame) == request


@settings(max_examples=150, deadline=None)
@given(flag=st.sampled_from([0, 1, -123456, -654321, -234561]),
       values=st.lists(st.one_of(_finite, _text), max_size=w.MAX_REPORTED))
def test_regular_reply_round_trip(flag: int, values: list[float | str]) -> None:
    reply = w.RegularReply(flag, tuple(values))
    assert w.decode_reply(w.Function.REGULAR, w.encode_reply(reply)) == reply


@settings(max_examples=50, deadline=None)
@given(info=st.builds(w.ImageInfo, *([_i32] * 4), st.integers(0, 2**31 - 1),
                      st.integers(1, 100)),
       ok=st.booleans())
def test_fixed_replies_round_trip(info: w.ImageInfo, ok: bool) -> None:
    assert w.decode_reply(w.Function.GET_IMAGE, w.encode_reply(info)) == info
    assert w.decode_reply(w.Function.OK_TO_RUN, w.encode_reply(w.OkToRunReply(ok))) \
        == w.OkToRunReply(ok)


@settings(max_examples=50, deadline=None)
@given(req=st.one_of(
    st.builds(w.GetImageRequest, st.integers(0, 7), st.booleans()),
    st.builds(w.PutImageRequest, *([_i32] * 9)),
    st.just(w.OkToRunRequest()), st.just(w.HandshakeRequest())))
def test_fixed_requests_round_trip(req: w.Request) -> None:
    assert w.decode_request(w.encode_request(req)) == req


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "uint16", "rgb"])
@pytest.mark.parametrize("pad", [0, 3])
def test_image_bytes_round_trip(dtype: str, pad: int) -> None:
    rng = np.random.default_rng(1)
    if dtype == "rgb":
        image = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    else:
        image = (rng.random((5, 7)) * 1000).astype(dtype)
    line = image.strides[0]
    info, raw = fr.image_to_bytes(image, row_bytes=line + pad)
    assert info.mode == {"uint8": 0, "int16": 1, "float32": 2, "uint16": 6, "rgb": 16}[dtype]
    assert (info.width, info.height, info.row_bytes) == (7, 5, line + pad)
    assert len(raw) == info.num_bytes == (line + pad) * 5
    back = fr.image_from_bytes(info, raw)
    assert back.dtype == image.dtype and np.array_equal(back, image)


def test_chunk_sizes_follow_serialem() -> None:
    assert fr.num_chunks(4096 * 4096 * 2) == 1      # a 4k x 4k int16 image is one chunk
    assert fr.num_chunks(w.SERVER_CHUNK_BYTES + 1) == 2
    assert fr.chunk_sizes(10, 3) == [4, 4, 2]
    assert fr.chunk_sizes(9, 3) == [3, 3, 3]


# --------------------------------------------------------------------------- bad frames

_GOOD_REPLY = w.encode_reply(w.RegularReply(0, (10.0, "abc", -5.5)))


@pytest.mark.parametrize("cut", range(len(_GOOD_REPLY)))
def test_truncated_reply_raises(cut: int) -> None:
    with pytest.raises(ProtocolError):
        w.decode_reply(w.Function.REGULAR, _GOOD_REPLY[:cut])


def _patched(frame: bytes, offset: int, value: int) -> bytes:
    out = bytearray(frame)
    struct.pack_into("<i", out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(("function", "frame"), [
    pytest.param(w.Function.REGULAR, _patched(_GOOD_REPLY, 16, 99), id="array-words-too-many"),
    pytest.param(w.Function.REGULAR, _patched(_GOOD_REPLY, 16, 5), id="array-words-too-few"),
    pytest.param(w.Function.REGULAR, _patched(_GOOD_REPLY, 8, 6), id="seven-values"),
    pytest.param(w.Function.REGULAR, _patched(_GOOD_REPLY, 8, -2), id="negative-high"),
    pytest.param(w.Function.REGULAR, _patched(_GOOD_REPLY, 4, 3), id="positive-retval"),
    pytest.param(w.Function.REGULAR, _patched(_GOOD_REPLY, 4, -9), id="error-in-long-frame"),
    pytest.param(w.Function.REGULAR, _patched(_GOOD_REPLY, 0, 200), id="length-mismatch"),
    pytest.param(w.Function.REGULAR, struct.pack("<5i", 32, 0, 0, 0, 3) + struct.pack("<i", 1)
                 + struct.pack("<d", 0.0), id="flagged-string-missing"),
    pytest.param(w.Function.REGULAR, struct.pack("<5i", 32, 0, 0, 0, 3) + struct.pack("<i", 1)
                 + b"abcdefgh", id="string-without-nul"),
    pytest.param(w.Function.REGULAR, struct.pack("<5i", 20, 0, 0, 0, 0), id="no-array"),
    pytest.param(w.Function.OK_TO_RUN, struct.pack("<2i", 8, 0), id="ok-without-bool"),
    pytest.param(w.Function.GET_IMAGE, struct.pack("<7i", 28, 0, 1, 2, 1, 1, 2),
                 id="image-header-short"),
    pytest.param(w.Function.GET_IMAGE, struct.pack("<8i", 32, 0, 1, 2, 1, 1, 2, 0),
                 id="image-zero-chunks"),
    pytest.param(w.Function.PUT_IMAGE, struct.pack("<3i", 12, 0, 0), id="put-ack-long"),
])
def test_inconsistent_reply_raises(function: w.Function, frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        w.decode_reply(function, frame)


_GOOD_REQUEST = w.encode_request(w.RegularRequest(286, (w.WireArg("10.", 10.0),)))


@pytest.mark.parametrize(("frame", "code"), [
    pytest.param(b"\x04\0\0\0", w.ServerCode.TOO_SHORT, id="short"),
    pytest.param(struct.pack("<2i", 8, 9), w.ServerCode.UNKNOWN_FUNCTION, id="function-9"),
    pytest.param(struct.pack("<3i", 12, 4, 0), w.ServerCode.TOO_SHORT, id="get-image-short"),
    pytest.param(struct.pack("<5i", 20, 4, 0, 0, 0), w.ServerCode.WRONG_LENGTH,
                 id="get-image-long"),
    pytest.param(_patched(_GOOD_REQUEST, 16, 3), w.ServerCode.WRONG_LENGTH, id="words"),
    pytest.param(_patched(_GOOD_REQUEST, 12, 25), w.ServerCode.TOO_BIG, id="25-args"),
    pytest.param(_GOOD_REQUEST[:-4].replace(_GOOD_REQUEST[:4], struct.pack("<i",
                 len(_GOOD_REQUEST) - 4), 1), w.ServerCode.WRONG_LENGTH, id="truncated"),
    pytest.param(_patched(_GOOD_REQUEST, 0, 99), w.ServerCode.WRONG_LENGTH, id="length"),
    pytest.param(_patched(_patched(_GOOD_REQUEST, 12, 2), 16, 7), w.ServerCode.WRONG_LENGTH,
                 id="slots-past-array"),
])
def test_bad_request_is_rejected_with_serialem_code(frame: bytes, code: w.ServerCode) -> None:
    with pytest.raises(w.FrameRejected) as info:
        w.decode_request(frame)
    assert info.value.code == code
    assert isinstance(info.value, ProtocolError)


# --------------------------------------------------------------------------- sockets


@pytest.fixture
def pair() -> object:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_read_frame_whole_and_split(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    frame = w.encode_reply(w.RegularReply(0, (1.0,)))
    a.sendall(frame[:3])
    a.sendall(frame[3:])
    assert fr.read_frame(b) == frame


def test_eof_between_frames_is_connection_lost(pair: tuple[socket.socket, socket.socket]
                                               ) -> None:
    a, b = pair
    a.close()
    with pytest.raises(ConnectionLost) as info:
        fr.read_frame(b)
    assert not isinstance(info.value, ProtocolError)


def test_eof_inside_frame_is_protocol_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(w.encode_reply(w.RegularReply(0, (1.0,)))[:10])
    a.close()
    with pytest.raises(ProtocolError):
        fr.read_frame(b)


@pytest.mark.parametrize(("length", "code"), [(4, w.ServerCode.TOO_SHORT),
                                              (2**30, w.ServerCode.TOO_BIG)])
def test_absurd_length_prefix(pair: tuple[socket.socket, socket.socket], length: int,
                              code: w.ServerCode) -> None:
    a, b = pair
    a.sendall(struct.pack("<i", length))
    with pytest.raises(w.FrameRejected) as info:
        fr.read_frame(b)
    assert info.value.code == code


def test_socket_timeout_is_device_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    b.settimeout(0.05)
    with pytest.raises(DeviceTimeout):
        fr.read_frame(b)


def test_image_chunks_with_handshakes(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    image = np.arange(30 * 17, dtype=np.int16).reshape(30, 17)
    info, raw = fr.image_to_bytes(image, row_bytes=36)
    info = w.ImageInfo(info.mode, info.row_bytes, info.width, info.height, info.num_bytes, 4)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            fr.send_image_chunks(server, raw, 4)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread, which fails
            errors.append(err)

    t = threading.Thread(target=serve)
    t.start()
    data = fr.recv_image_chunks(client, info)
    t.join(5)
    assert errors == []
    assert np.array_equal(fr.image_from_bytes(info, data), image)


def test_missing_handshake_is_detected(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(w.encode_request(w.OkToRunRequest()))
    with pytest.raises(ProtocolError):
        fr.send_image_chunks(server, b"\1" * 10, 2)
