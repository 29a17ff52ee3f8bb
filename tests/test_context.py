"""The model's context, without Ray: where it comes from (max_position_embeddings, or a smaller
--max-model-len), what a request past it gets (400 context_length_exceeded in OpenAI's and vLLM's
words, before the 413 of the size cap), and chat's default length (up to the context)."""

import httpx
import pytest

from moe_models.loading import spec_from_pretrained
from moe_serving.errors import ServingError
from moe_serving.http_client import _error
from router_service.config import BatchLimits
from router_service.default_model import default_model_dir
from router_service.serving.launch import fit_settings
from router_service.serving.settings import ServingSettings


@pytest.fixture(scope="module")
def spec():
    return spec_from_pretrained(default_model_dir())


def test_the_context_is_the_checkpoints_positions_or_a_smaller_max_model_len(spec):
    assert spec.max_position_embeddings == 2048
    assert fit_settings(ServingSettings(), BatchLimits(), spec).max_model_len == 2048
    assert fit_settings(ServingSettings(max_model_len=512), BatchLimits(), spec).max_model_len == 512
    with pytest.raises(ValueError, match="max_model_len 4096 is more than the model's context"):
        fit_settings(ServingSettings(max_model_len=4096), BatchLimits(), spec)
    with pytest.raises(ValueError, match="max_model_len must be an integer >= 1"):
        ServingSettings(max_model_len=0)


def test_past_the_context_is_a_400_context_length_exceeded_before_the_size_cap():
    s = ServingSettings(max_model_len=100, max_request_tokens=50)
    with pytest.raises(ServingError) as e:
        s.completion_tokens(90, 20)  # over both: the context answers first
    err = e.value
    assert (err.http_status, err.code, err.reason) == (400, "invalid_argument", "context_length_exceeded")
    assert err.message == (
        "This model's maximum context length is 100 tokens. However, you requested 110 tokens "
        "(90 in the messages, 20 in the completion). Please reduce the length of the messages or "
        "completion."
    )
    assert err.to_json() == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": None,
            "code": "context_length_exceeded",
        }
    }
    with pytest.raises(ServingError) as e:
        s.completion_tokens(30, 30)  # within the context, over the cap: merely too big
    assert e.value.http_status == 413 and e.value.reason is None
    assert s.completion_tokens(30, 20) == 20
    wide = ServingSettings(max_model_len=100, max_request_tokens=1000)
    assert wide.completion_tokens(100, 0) == 0  # echo scoring a prompt that fills the context
    with pytest.raises(ServingError, match="maximum context length is 100"):
        wide.completion_tokens(101, 0)
    with pytest.raises(ServingError, match="However, your messages resulted in 100 tokens") as e:
        s.completion_tokens(100, None)
    assert e.value.reason == "context_length_exceeded"


def test_chat_default_runs_up_to_the_context_within_the_cap():
    assert ServingSettings(max_model_len=100).completion_tokens(30, None) == 70
    assert ServingSettings(max_model_len=100).completion_tokens(99, None) == 1
    assert ServingSettings(max_model_len=None, max_request_tokens=64).completion_tokens(30, None) == 34
    capped = ServingSettings(max_model_len=4096, max_request_tokens=1024)
    assert capped.completion_tokens(24, None) == 1000  # the cap, not a 413 for a request with no max_tokens
    with pytest.raises(ServingError) as e:
        capped.completion_tokens(2000, None)
    assert e.value.http_status == 413


def test_the_http_client_keeps_openais_code_and_the_error_crosses_processes_whole():
    err = ServingError("invalid_argument", "too long", reason="context_length_exceeded")
    back = _error(httpx.Response(400, json=err.to_json()))
    assert (back.code, back.reason, back.message, back.status) == (
        "invalid_argument",
        "context_length_exceeded",
        "too long",
        400,
    )
    fn, args = err.__reduce__()
    assert fn(*args).reason == "context_length_exceeded"
