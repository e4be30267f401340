"""Tests for consortium.models.architectures: models, registry, parameter exchange."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from consortium.errors import ConfigError, ConsortiumError, DataError
from consortium.models import (
    Autoencoder,
    MLPClassifier,
    architectures,
    available_models,
    build_model,
    get_parameters,
    model_task,
    parameter_names,
    register_model,
    set_parameters,
)

torch.set_num_threads(1)


@pytest.fixture
def private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give each test its own copy of the model registry (restored afterwards)."""
    monkeypatch.setattr(architectures, "_BUILDERS", dict(architectures._BUILDERS))


def _inputs(n: int = 5, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))


def test_mlp_returns_one_logit_per_row() -> None:
    model = MLPClassifier(6, hidden=(8, 4), dropout=0.0)
    out = model(_inputs())
    assert out.shape == (5,)
    assert model_task(model) == "classifier"


def test_mlp_without_hidden_layers_is_logistic_regression() -> None:
    model = MLPClassifier(6, hidden=())
    assert parameter_names(model) == ["layers.0.weight", "layers.0.bias"]
    assert model(_inputs()).shape == (5,)


def test_autoencoder_reconstructs_input_shape_and_scores_rows() -> None:
    model = Autoencoder(6, hidden=(4, 2))
    x = _inputs()
    recon = model(x)
    assert recon.shape == (5, 6)
    expected = ((recon - x) ** 2).mean(dim=1)
    torch.testing.assert_close(model.score(x), expected)
    assert model_task(model) == "reconstruction"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_features": 0}, "n_features"),
        ({"n_features": True}, "n_features"),
        ({"n_features": 4, "hidden": (8, 0)}, "hidden"),
        ({"n_features": 4, "hidden": "64"}, "hidden"),
        ({"n_features": 4, "dropout": 1.0}, "dropout"),
        ({"n_features": 4, "dropout": -0.1}, "dropout"),
    ],
)
def test_mlp_rejects_bad_arguments_naming_them(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}' parameter of MLPClassifier"):
        MLPClassifier(**kwargs)


def test_autoencoder_needs_a_bottleneck() -> None:
    with pytest.raises(ConfigError, match="'hidden' parameter of Autoencoder"):
        Autoencoder(4, hidden=())


def test_build_model_is_deterministic_by_seed() -> None:
    a = get_parameters(build_model("mlp", 7, seed=3))
    b = get_parameters(build_model("mlp", 7, seed=3))
    c = get_parameters(build_model("mlp", 7, seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_build_model_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("autoencoder", 5, seed=9)
    torch.testing.assert_close(torch.rand(3), expected)


def test_build_model_uses_hidden_sizes() -> None:
    model = build_model("autoencoder", 5, hidden=(3, 2))
    assert isinstance(model, Autoencoder)
    assert model.hidden == (3, 2)
    assert isinstance(build_model("mlp", 5), MLPClassifier)


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(ConfigError, match=r"'kind' parameter of build_model.*autoencoder.*mlp"):
        build_model("transformer", 5)


def test_register_model_adds_a_kind_and_refuses_silent_replacement(
    private_registry: None,
) -> None:
    def tiny(n_features: int, *, hidden: object) -> nn.Module:
        return nn.Linear(n_features, 1)

    register_model("tiny", tiny)
    assert "tiny" in available_models()
    assert isinstance(build_model("tiny", 3), nn.Linear)
    with pytest.raises(ConfigError, match="already registered"):
        register_model("tiny", tiny)
    register_model("tiny", lambda n, *, hidden: MLPClassifier(n), force=True)
    assert isinstance(build_model("tiny", 3), MLPClassifier)


def test_builder_must_return_a_module(private_registry: None) -> None:
    register_model("broken", lambda n, *, hidden: "not a module")
    with pytest.raises(ConfigError, match="must return a torch.nn.Module"):
        build_model("broken", 3)


def test_get_set_parameters_round_trip() -> None:
    source = build_model("mlp", 6, seed=1)
    target = build_model("mlp", 6, seed=2)
    arrays = get_parameters(source)
    assert [a.dtype for a in arrays] == [np.float32] * len(arrays)
    assert len(arrays) == len(parameter_names(source))
    set_parameters(target, arrays)
    source.eval()
    target.eval()
    x = _inputs()
    torch.testing.assert_close(target(x), source(x))


def test_get_parameters_returns_copies() -> None:
    model = build_model("mlp", 4)
    arrays = get_parameters(model)
    arrays[0][...] = 42.0
    assert not np.any(get_parameters(model)[0] == 42.0)


def test_set_parameters_accepts_float64_aggregates() -> None:
    model = build_model("autoencoder", 4)
    arrays = [a.astype(np.float64) + 1.0 for a in get_parameters(model)]
    set_parameters(model, arrays)
    np.testing.assert_allclose(get_parameters(model)[0], arrays[0], rtol=1e-6)


def test_buffers_are_exchanged_too() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    names = parameter_names(model)
    assert "1.running_mean" in names and "1.num_batches_tracked" in names
    arrays = get_parameters(model)
    arrays[names.index("1.running_mean")] = np.array([0.5, -0.5], dtype=np.float32)
    arrays[names.index("1.num_batches_tracked")] = np.array(7.0, dtype=np.float32)
    set_parameters(model, arrays)
    state = model.state_dict()
    torch.testing.assert_close(state["1.running_mean"], torch.tensor([0.5, -0.5]))
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert int(state["1.num_batches_tracked"]) == 7


def test_wrong_shape_names_layer_and_shapes_and_leaves_model_unchanged() -> None:
    model = build_model("mlp", 6, hidden=(8,))
    before = get_parameters(model)
    arrays = [a + 1.0 for a in before]
    arrays[2] = np.zeros((1, 9), dtype=np.float32)  # layers.3.weight expects (1, 8)
    with pytest.raises(ConfigError) as info:
        set_parameters(model, arrays)
    message = str(info.value)
    assert "'layers.3.weight'" in message
    assert "(1, 8)" in message and "(1, 9)" in message
    after = get_parameters(model)
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))


def test_wrong_count_is_a_config_error_listing_the_layers() -> None:
    model = build_model("mlp", 6, hidden=(8,))
    with pytest.raises(ConfigError, match=r"must hold 4 arrays .*layers\.0\.weight.*Got 3"):
        set_parameters(model, get_parameters(model)[:3])


def test_non_finite_values_are_a_data_error_naming_the_layer() -> None:
    model = build_model("mlp", 6, hidden=(8,))
    arrays = get_parameters(model)
    arrays[1][0] = np.nan
    with pytest.raises(DataError, match=r"finite values for layer 'layers\.0\.bias'"):
        set_parameters(model, arrays)


def test_integer_arrays_are_rejected() -> None:
    model = build_model("mlp", 2, hidden=())
    arrays = [a.astype(np.int64) for a in get_parameters(model)]
    with pytest.raises(DataError, match="float dtype"):
        set_parameters(model, arrays)


def test_set_parameters_needs_a_list_of_arrays() -> None:
    model = build_model("mlp", 2, hidden=())
    with pytest.raises(ConsortiumError, match="'arrays' parameter of set_parameters"):
        set_parameters(model, np.zeros(3, dtype=np.float32))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="must be a numpy array"):
        set_parameters(model, [[0.0, 0.0], [0.0]])  # type: ignore[list-item]


def test_model_task_reads_the_task_attribute() -> None:
    assert model_task(nn.Linear(2, 1)) == "classifier"
    odd = nn.Linear(2, 1)
    odd.task = "regression"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="'task' attribute of Linear"):
        model_task(odd)
