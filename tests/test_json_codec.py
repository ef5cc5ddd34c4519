"""The paid path's JSON: what the standard library encoded still encodes, to the same values."""

import json
import math

from node.json_codec import dumps


def test_a_response_body_reads_back_as_it_was():
    body = {"id": "cmpl-1", "choices": [{"index": 0, "text": "é\n\"ü\" 🌊", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "receipt": {"fee": str(10**30)}}
    assert json.loads(dumps(body)) == body
    assert b" " not in dumps({"a": [1, 2]})  # compact, as the stream's chunks were


def test_an_integer_past_64_bits_and_a_non_string_key_still_encode():
    assert json.loads(dumps({"charged": 2**200})) == {"charged": 2**200}
    assert json.loads(dumps({1: "a"})) == {"1": "a"}


def test_a_float_that_is_not_finite_is_null_not_invalid_json():
    assert json.loads(dumps({"logprob": -math.inf, "x": math.nan})) == {"logprob": None, "x": None}
