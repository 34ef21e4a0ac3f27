"""The algorithm registry: each name resolves to its Algorithm; the data-free ones never run the model."""

import pytest
import torch
from tiny_models import tiny_model

from lighten.algorithms.calibrate import calibrate_model
from lighten.algorithms.registry import ALGORITHMS, Algorithm, get_algorithm
from lighten.errors import LightenError
from lighten.plan import make_plan
from lighten.quantize import quantize_weights


def test_every_name_resolves_to_its_algorithm():
    for name in ALGORITHMS:
        algorithm = get_algorithm(name)
        assert isinstance(algorithm, Algorithm) and algorithm.name == name
    assert [n for n in ALGORITHMS if not get_algorithm(n).needs_data] == ["rtn", "mse"]


def test_unknown_name_lists_the_registry():
    with pytest.raises(LightenError, match="'sgd': use one of rtn, mse, gptq, awq"):
        get_algorithm("sgd")


@pytest.mark.parametrize("name", ["rtn", "mse"])
def test_data_free_algorithms_run_no_forward_pass_and_read_no_text(name):
    model = tiny_model("llama")
    plan = make_plan(model, "int4:g32")
    want = quantize_weights(model, plan, quantize_weight=get_algorithm(name).quantize_weight)

    def refuse(module, args, kwargs):
        raise AssertionError("forward pass")

    for module in model.modules():
        module.register_forward_pre_hook(refuse, with_kwargs=True)
    got = calibrate_model(model, tokenizer=None, texts=None, plan=plan, algorithm=name)
    for weight, q in want.items():
        assert all(torch.equal(got[weight].tensors[k], t) for k, t in q.tensors.items()), weight
