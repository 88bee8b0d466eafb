"""The heads as plain modules: shapes, probabilities, the L2 set, rebuild from config, RNG hygiene."""

import numpy as np
import pytest
import torch

from hpcllm.train.heads import LinearHead, MLPHead, build_head, predict, predict_proba
from test_train_fixtures import one_torch_thread, warm_kernel_cache  # noqa: F401 (autouse)



def test_linear_head_is_standardised_logistic_regression():
    head = LinearHead(3, 4)
    with torch.no_grad():
        head.linear.weight.copy_(torch.arange(12.0).view(4, 3) / 10)
        head.linear.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    head.set_standardisation(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 0.5]))
    x = np.array([[3.0, 6.0, 2.0], [1.0, 2.0, 3.0]], np.float32)
    z = (x - [1, 2, 3]) / np.array([2, 4, 0.5])
    logits = z @ (np.arange(12.0).reshape(4, 3) / 10).T + [0.5, -0.5, 0.0, 1.0]
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(predict_proba(head, x), expected, rtol=1e-6)
    np.testing.assert_array_equal(predict(head, x), expected.argmax(1))


def test_penalised_are_the_weight_matrices_only():
    assert [p.shape for p in LinearHead(5, 3).penalised()] == [(3, 5)]
    assert [p.shape for p in MLPHead(5, 3, hidden=7).penalised()] == [(7, 5), (3, 7)]


@pytest.mark.parametrize("config", [{"kind": "linear", "d": 6, "n_classes": 3},
                                    {"kind": "mlp", "d": 6, "n_classes": 3, "hidden": 4, "activation": "relu",
                                     "dropout": 0.0}])
def test_build_head_round_trips_its_config_and_leaves_the_global_rng_alone(config):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_head(config, seed=9)
    assert torch.rand(1) == before                        # fork_rng: the caller's stream is untouched
    b = build_head(a.config(), seed=9)
    assert a.config() == config
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    p = predict_proba(a, x)
    assert p.shape == (5, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)


def test_empty_input_and_bad_arguments():
    assert predict_proba(LinearHead(4, 2), np.zeros((0, 4), np.float32)).shape == (0, 2)
    with pytest.raises(ValueError, match="activation"):
        MLPHead(4, 2, activation="tanh")
    with pytest.raises(ValueError, match="head kind"):
        build_head({"kind": "svm", "d": 4, "n_classes": 2})
