from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt import ByteTokenizer

tok = ByteTokenizer()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_is_exact_for_any_unicode(text):
    ids = tok.encode(text)
    assert ids.dtype.kind == "i" and (ids >= 0).all() and (ids < 256).all()
    assert tok.decode(ids) == text


def test_round_trip_emoji_cjk_and_combining():
    text = "héllo 世界 🤖👩‍👩‍👧 é\u0301 \x00 \n"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("🤖")) == 4


def test_decode_never_raises_on_invalid_utf8():
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"
    assert tok.decode(tok.encode("世")[:2]) == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_stream_decoder_matches_whole_decode(text):
    dec = tok.stream_decoder()
    pieces = [dec.push(t) for t in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_stream_decoder_holds_back_partial_characters():
    dec = tok.stream_decoder()
    b = tok.encode("世")
    assert dec.push(b[0]) == "" and dec.push(b[1]) == "" and dec.push(b[2]) == "世"
    dec.push(0xE4)
    assert dec.flush() == "\ufffd"
