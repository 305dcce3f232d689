"""Incremental detokenization and stop strings (dspark/engine/detokenizer.py), on two real tokenizers: the
built-in model's BPE tokenizer and the byte-level tokenizer of the random test models (where one UTF-8
character spans several tokens). Property tests (hypothesis, derandomised) over random texts and token ids.

* Without stop strings, the streamed pieces add up to decode(prompt + output) minus decode(prompt).
* With stop strings, the final text is that text cut before the first occurrence of any stop string, the
  stop is reported at the token that completes it, and every streamed prefix is a prefix of the final text
  (a client never sees part of a stop string that is then taken back).
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark.engine.detokenizer import IncrementalDetokenizer, check_stop_strings
from dspark.errors import RequestError

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(alphabet=st.sampled_from(list("ab c.\n") + ["é", "日", "🙂", "ß"]), min_size=1, max_size=30)


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
    from transformers import PreTrainedTokenizerFast

    from dspark.models.random_init import byte_level_tokenizer
    from dspark.models.tokenizer import load_tokenizer
    from dspark.models.zoo import resolve_target

    if kind == "builtin":
        return load_tokenizer(resolve_target(None))
    return PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), eos_token="<|im_end|>")


def stream(tok, prompt_ids, output_ids, stop=()):
    """(pieces handed out after each token, index of the token that hit a stop string or None, detokenizer)."""
    detok = IncrementalDetokenizer(tok, prompt_ids, stop)
    pieces, hit = [], None
    for i, token in enumerate(output_ids):
        if detok.add(token):
            hit = i
            pieces.append(detok.take_new_text())
            break
        pieces.append(detok.take_new_text())
    if hit is None:
        pieces.append(detok.take_new_text(final=True))
    return pieces, hit, detok


def reference_text(tok, prompt_ids, output_ids) -> str:
    prompt = tok.decode(prompt_ids, skip_special_tokens=True)
    return tok.decode(list(prompt_ids) + list(output_ids), skip_special_tokens=True)[len(prompt):]


@pytest.mark.parametrize("kind", ["builtin", "bytes"])
@SETTINGS
@given(prompt=TEXT, output=TEXT)
def test_streamed_text_adds_up_to_the_decoded_output(kind, prompt, output):
    tok = tokenizer(kind)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    output_ids = tok.encode(output, add_special_tokens=False)
    pieces, hit, detok = stream(tok, prompt_ids, output_ids)
    assert hit is None
    assert "".join(pieces) == reference_text(tok, prompt_ids, output_ids) == detok.text
    assert all("\ufffd" not in piece for piece in pieces[:-1])  # no half character is ever shown


@pytest.mark.parametrize("kind", ["builtin", "bytes"])
@SETTINGS
@given(prompt=TEXT, output=TEXT, data=st.data())
def test_stop_strings_cut_the_text_and_never_leak(kind, prompt, output, data):
    tok = tokenizer(kind)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    output_ids = tok.encode(output, add_special_tokens=False)
    full = reference_text(tok, prompt_ids, output_ids)
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start: start + data.draw(st.integers(1, 4))]
    other = data.draw(st.sampled_from(["zz", "q", stop[::-1] + "x"]))
    pieces, hit, detok = stream(tok, prompt_ids, output_ids, (other, stop))
    first = min(i for i in (full.find(stop), full.find(other)) if i >= 0)
    assert detok.text == full[:first] == "".join(pieces)
    # The stop is reported at the first token whose text contains a stop string.
    texts = [reference_text(tok, prompt_ids, output_ids[: i + 1]) for i in range(len(output_ids))]
    assert hit == next(i for i, t in enumerate(texts) if stop in t or other in t)
    shown = ""
    for piece in pieces:
        shown += piece
        assert detok.text.startswith(shown)


def test_text_that_may_start_a_stop_string_is_held_back():
    tok = tokenizer("bytes")
    detok = IncrementalDetokenizer(tok, tok.encode("x", add_special_tokens=False), ("END",))
    shown = ""
    for ch in "abcEN":
        assert not detok.add(tok.encode(ch, add_special_tokens=False)[0])
        shown += detok.take_new_text()
    assert shown == "abc"  # "EN" may still become "END"
    assert not detok.add(tok.encode("D"[0].lower(), add_special_tokens=False)[0])  # "ENd": not a stop string
    assert detok.take_new_text() == "ENd"
    for ch in "EN":
        detok.add(tok.encode(ch, add_special_tokens=False)[0])
    assert detok.take_new_text() == ""
    assert detok.add(tok.encode("D", add_special_tokens=False)[0])
    assert detok.take_new_text() == "" and detok.text == "abcENd"


@pytest.mark.parametrize("stop, message", [("", "must not be empty"), ([1], "list of strings"),
                                           (["a"] * 17, "at most 16")])
def test_bad_stop_strings_are_request_errors(stop, message):
    with pytest.raises(RequestError, match=message):
        check_stop_strings(stop)
    assert check_stop_strings(["a", "a", "b"]) == ("a", "b") and check_stop_strings("x") == ("x",)
