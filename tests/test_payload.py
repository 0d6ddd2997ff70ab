import base64

import pytest

from handler.payload import UnsupportedMediaTypeError, parse_request, parse_topk
from handler.preprocessing import BadParameterError, ClientError, DecodeError

pytestmark = pytest.mark.unit
IMG = b"\xff\xd8\xff\xe0fake-jpeg-bytes"


@pytest.mark.parametrize("row,headers,expected_k", [
    ({"body": IMG}, {"Content-Type": "image/jpeg"}, 5),                # curl -T / --data-binary
    ({"data": IMG, "topk": b"2"}, {}, 2),                             # multipart, topk as bytes
    ({"data": IMG, "topk": "3"}, {}, 3),                              # multipart text field
    ({"body": {"data": base64.b64encode(IMG).decode(), "topk": 1}},
     {"content-type": "application/json"}, 1),                        # JSON, parsed by the worker
    ({"body": IMG, "model_name": "m", "topk": "4"}, {}, 4),           # /invocations?topk=4
])
def test_accepted_request_forms(row, headers, expected_k):
    parsed = parse_request(row, headers, default_topk=5)
    assert parsed.images == [IMG] and parsed.k == expected_k and parsed.form == "single"


def test_topk_clamping_is_left_to_postprocessing():
    assert parse_request({"data": IMG, "topk": "10000"}, {}, 5).k == 10000


@pytest.mark.parametrize("value", ["0", "-1", "abc", "2.5", "", b"x", True, 1.5, [3]])
def test_invalid_topk_is_a_422(value):
    with pytest.raises(BadParameterError) as err:
        parse_topk(value, 5)
    assert err.value.status == 422 and err.value.reason == "bad_parameter"


@pytest.mark.parametrize("row,headers,error,match", [
    ({}, {}, ClientError, "no image"),
    ({"topk": b"3"}, {}, ClientError, "no image"),                      # multipart without a file
    ({"body": b""}, {}, DecodeError, "empty"),
    ({"body": {"topk": 2}}, {}, ClientError, '"data" field'),
    ({"body": {"data": "not base64!!"}}, {}, ClientError, "base64"),
    ({"body": {"data": 12}}, {}, ClientError, "base64 string"),
    ({"body": "some text"}, {"Content-Type": "text/plain"}, UnsupportedMediaTypeError, "not image bytes"),
    ({"\xff\xd8garbage": b""}, {"Content-Type": "application/x-www-form-urlencoded"},
     UnsupportedMediaTypeError, "Content-Type: application/octet-stream"),
])
def test_bad_requests_name_the_problem(row, headers, error, match):
    with pytest.raises(error, match=match) as err:
        parse_request(row, headers, 5)
    assert 400 <= err.value.status < 500


@pytest.mark.parametrize("body", [["a"], [256], -1, 1.5, 100000000000, "text", True])
def test_json_whose_top_level_is_not_an_object_is_a_400(body):
    """The worker parses application/json; a list or a number used to reach bytes(...): 500, and
    bytes(100000000000) tried to allocate 100 GB."""
    with pytest.raises(ClientError) as err:
        parse_request({"body": body}, {"Content-Type": "application/json"}, 5)
    assert err.value.status == 400 and "must be an object" in str(err.value)


@pytest.mark.parametrize("content_type", ["Application/JSON", "application/json; charset=utf-8",
                                          "APPLICATION/JSON;charset=UTF-8"])
def test_json_media_type_is_case_insensitive_and_takes_parameters(content_type):
    """The worker only parses the exact "application/json"; the rest arrives as bytes."""
    raw = ('{"data": "%s", "topk": 2}' % base64.b64encode(IMG).decode()).encode()
    parsed = parse_request({"body": raw}, {"content-type": content_type}, 5)
    assert (parsed.images, parsed.k) == ([IMG], 2)
    with pytest.raises(ClientError, match="not valid JSON"):
        parse_request({"body": b"{not json"}, {"content-type": content_type}, 5)
    with pytest.raises(ClientError, match="must be an object"):
        parse_request({"body": b"[1, 2]"}, {"content-type": content_type}, 5)
