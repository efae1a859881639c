"""Property tests of request decoding (hypothesis): whatever a client sends, decoding
and validation raise RequestError or nothing, never anything else, and what they
accept is a finite real float array of the model's shape in the ingestion scale."""

import base64
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serving_fakes import CFG

from cohortcast.data.manifest import EHR_FEATURES
from cohortcast.serving.requests import ForecastRequest, PreparedRequest, RequestError, check_ehr, decode_npy, prepare

SHAPE = (8, 8)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


arrays = hnp.arrays(
    dtype=st.one_of(hnp.floating_dtypes(), hnp.complex_number_dtypes(), hnp.integer_dtypes(), hnp.boolean_dtypes()),
    shape=st.one_of(st.just(SHAPE), hnp.array_shapes(max_dims=3, max_side=9)),
)


def accepted(array: np.ndarray) -> None:
    assert array.dtype.kind == "f" and array.shape == SHAPE and np.isfinite(array).all()


@FAST
@given(st.text(max_size=200))
def test_any_text_decodes_or_is_a_request_error(text):
    try:
        accepted(decode_npy(text, "crop", SHAPE))
    except RequestError as exc:
        assert exc.field == "crop" and exc.status == 400


@FAST
@given(arrays)
def test_any_array_decodes_only_as_finite_real_floats(array):
    text = base64.b64encode(npy_bytes(array)).decode()
    try:
        decoded = decode_npy(text, "crop", SHAPE)
    except RequestError:
        assert array.dtype.kind != "f" or array.shape != SHAPE or not np.isfinite(array).all()
        return
    accepted(decoded)
    np.testing.assert_array_equal(decoded, array)


@FAST
@given(st.binary(max_size=300), st.integers(0, 120))
def test_corrupted_npy_bytes_are_request_errors(noise, cut):
    good = npy_bytes(np.zeros(SHAPE, np.float32))
    for raw in (good[:cut] + noise, noise + good, good[:cut]):
        try:
            accepted(decode_npy(base64.b64encode(raw).decode(), "crop", SHAPE))
        except RequestError:
            pass


@FAST
@given(st.dictionaries(st.one_of(st.sampled_from(EHR_FEATURES), st.text(max_size=10)), json_values, max_size=5))
def test_any_ehr_record_is_accepted_or_a_request_error(record):
    try:
        checked = check_ehr(record)
    except RequestError as exc:
        assert exc.field.startswith("ehr")
        return
    for name, value in checked.items():  # what passed is a known feature with a usable value
        assert name in EHR_FEATURES
        assert (
            value is None
            or isinstance(value, str)
            or (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(float(value)))
        )


@FAST
@given(
    crop=st.one_of(hnp.arrays(np.float32, SHAPE, elements=st.floats(-1.5, 1.5, width=32)), arrays),
    horizon=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers()),
    samples=st.one_of(st.none(), st.integers()),
    steps=st.one_of(st.none(), st.integers()),
    seed=st.integers(0, 2**63 - 1),
    ehr=st.dictionaries(st.sampled_from(EHR_FEATURES), json_values, max_size=3),
    uses_ehr=st.booleans(),
)
def test_prepare_accepts_only_valid_requests(crop, horizon, samples, steps, seed, ehr, uses_ehr):
    request = ForecastRequest.model_construct(
        crop_npy_b64=base64.b64encode(npy_bytes(crop)).decode(),
        horizon_days=horizon,
        num_samples=samples,
        steps=steps,
        seed=seed,
        ehr=ehr,
    )
    try:
        item = prepare(request, SHAPE, CFG, uses_ehr)
    except RequestError:
        return
    assert isinstance(item, PreparedRequest)
    accepted(item.crop)
    assert item.crop.dtype == np.float32 and np.abs(item.crop).max() <= 1.0001
    assert np.isfinite(item.horizon_days) and 0 < item.horizon_days <= CFG.max_horizon_days
    assert 1 <= item.num_samples <= CFG.max_samples and 1 <= item.steps <= CFG.max_steps
    assert (item.ehr is not None) == uses_ehr
