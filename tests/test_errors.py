"""Bad input and bad checkpoints fail early with a ValueError a user can act on."""

import json
import shutil

import pytest
import torch
from tiny_models import VOCAB

from moe_models.families import UNSUPPORTED_FAMILIES
from moe_models.loading import spec_from_pretrained
from moe_models.spec import ConfigError
from router_service import Engine
from router_service.errors import WorkerError


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine.from_pretrained(tiny_model_dir("deepseek_v3"), num_workers=2) as e:
        yield e


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[1, 2, VOCAB]]), "outside the vocabulary"),
        (torch.tensor([[1, -1]]), "outside the vocabulary"),
        (torch.tensor([1, 2, 3]), "2-D"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "2-D"),
        (torch.zeros(0, 4, dtype=torch.long), "empty"),
        (torch.zeros(2, 0, dtype=torch.long), "empty"),
        (torch.tensor([[1.0, 2.0]]), "integer"),
        ("not ids", "tensor of token ids|integer|2-D"),
    ],
)
def test_forward_rejects_bad_ids(engine, ids, match):
    with pytest.raises(ValueError, match=match):
        engine.forward(ids)
    assert engine.forward(torch.tensor([[3, 4]])).shape == (1, 2, VOCAB)  # still serving


def test_bad_attention_mask(engine):
    with pytest.raises(ValueError, match="attention_mask shape"):
        engine.forward(torch.tensor([[3, 4]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="only 0"):
        engine.forward(torch.tensor([[3, 4]]), attention_mask=torch.tensor([[1, 2]]))


def test_moe_forward_rejects_dense_layer_and_bad_shapes(engine):
    with pytest.raises(ValueError, match=r"layer 0 is not a MoE layer.*\[1, 2\]"):
        engine.moe_forward(0, torch.randn(3, 32))
    with pytest.raises(ValueError, match="not a MoE layer"):
        engine.moe_forward(99, torch.randn(3, 32))
    with pytest.raises(ValueError, match=r"\[T, 32\]"):
        engine.moe_forward(1, torch.randn(3, 31))
    with pytest.raises(ValueError, match="empty"):
        engine.moe_forward(1, torch.randn(0, 32))
    with pytest.raises(ValueError, match="floating"):
        engine.moe_forward(1, torch.ones(3, 32, dtype=torch.long))


def test_generate_rejects_bad_settings(engine):
    ids = torch.tensor([[3, 4]])
    for kwargs, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=2, top_p=0.0), "top_p"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.generate(ids, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="float8"), "unknown dtype"),
        (dict(transport="carrier-pigeon"), "unknown transport"),
        (dict(num_workers=0), "num_workers"),
        (dict(num_workers=17), "num_workers"),
        (dict(device="tpu9"), "device"),
        (dict(expert_kernel="magic"), "expert kernel"),
        (dict(num_workers=21, redundant_experts=4), r"expert slots \(20 = 16 experts \+ 4 redundant\)"),
        (dict(redundant_experts=-1), "redundant_experts"),
        (dict(elastic={"worker_timeout": 3}), r"elastic: unknown field\(s\) \['worker_timeout'\]"),
        (dict(elastic={"autoscaling": {"min_workers": 3, "max_workers": 2}}), "min_workers <= max_workers"),
        (dict(worker_resources={"gpus": 1}), r"worker_resources: unknown field\(s\) \['gpus'\]"),
    ],
)
def test_from_pretrained_rejects_bad_settings(tiny_model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained(tiny_model_dir("deepseek_v3"), **kwargs)


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in dst.glob("*.safetensors"):  # config errors must come before any weight is read
        f.unlink()
    return dst


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(model_type="llama"), "unsupported model_type 'llama'.*supported families"),
        (dict(num_experts_per_tok=99), "num_experts_per_tok=99"),
        (dict(n_group=5), "n_group=5 must divide"),
        (dict(topk_group=9), "topk_group=9"),
        (dict(hidden_act="mish"), "expert activation .*Mish.* is not supported"),
    ],
)
def test_config_errors_name_the_problem(tiny_model_dir, tmp_path, changes, match):
    d = _copy_with_config(tiny_model_dir("deepseek_v3"), tmp_path / "bad", **changes)
    with pytest.raises(ConfigError, match=match):
        Engine.from_pretrained(d)


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Engine.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Engine.from_pretrained(tmp_path)


def test_worker_failure_names_worker_and_layer(tiny_model_dir):
    with Engine.from_pretrained(tiny_model_dir("deepseek_v3"), num_workers=2) as e:
        worker = e.router.dispatcher.transport.workers[1]
        weights = worker.layers.pop(2)  # the worker now raises inside forward for layer 2
        with pytest.raises(WorkerError, match="worker 1 failed in MoE layer 2"):
            e.forward(torch.randint(3, VOCAB, (2, 16)))
        worker.layers[2] = weights
        assert e.forward(torch.tensor([[3, 4]])).shape == (1, 2, VOCAB)


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED_FAMILIES))
def test_unsupported_family_refused_with_its_reason(tmp_path, model_type):
    """A known MoE family we do not serve is refused from config.json alone, naming why."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ConfigError) as err:
        spec_from_pretrained(tmp_path)
    assert UNSUPPORTED_FAMILIES[model_type] in str(err.value) and repr(model_type) in str(err.value)
