"""Property-based fuzzing of the decode + preprocess path (hypothesis).

Every input must end as a normalized float32 tensor or a ClientError (a 4xx for that request):
never another exception, which the handler would have to turn into a 500.
Brief in CI; ``HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py`` runs 20000 examples per test.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_PREPROCESSING, encode, scene
from handler.preprocessing import ClientError, EvalTransform

pytestmark = pytest.mark.unit
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TRANSFORM = EvalTransform.from_dict(TINY_PREPROCESSING)
SEEDS = {fmt: encode(scene(48, 40, seed=4), fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")}


def check(data: bytes) -> None:
    try:
        x = TRANSFORM.load(data)
    except ClientError as exc:
        assert 400 <= exc.status < 500 and str(exc)
        return
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()


@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    check(data)


@st.composite
def mutated_image(draw):
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite_header"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[max(pos, 8):]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:  # header fields: sizes, modes, chunk lengths
            data[min(pos, 40)] = draw(st.integers(0, 255))
        if not data:
            break
    return bytes(data)


@given(mutated_image())
def test_mutated_valid_images(data):
    check(data)
