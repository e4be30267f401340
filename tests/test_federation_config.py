"""FederationConfig: an empty hidden list is a logistic regression, and DP options are checked by name."""

from __future__ import annotations

import click
import pytest

from consortium.cli import _hidden_widths
from consortium.errors import ConfigError
from consortium.federation.config import FederationConfig
from consortium.federation.local_work import model_from
from consortium.models import build_model, get_parameters


def test_empty_hidden_is_logistic_regression_and_survives_the_run_config() -> None:
    cfg = FederationConfig(hidden=())
    assert FederationConfig.from_run_config(cfg.to_run_config()).hidden == ()


def test_empty_hidden_reaches_the_node_as_logistic_regression_not_the_default() -> None:
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from consortium.federation import messages as m

    params = get_parameters(build_model("mlp", 5, hidden=(), seed=0))
    content = RecordDict(
        {
            m.CONFIG: ConfigRecord({"model": "mlp", "hidden": "", "seed": 0}),
            m.GLOBAL_ARRAYS: ArrayRecord(params),
        }
    )
    model, _ = model_from(content, 5)
    assert sum(p.numel() for p in model.parameters()) == 6  # 5 weights + bias


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model": "autoencoder", "hidden": ()}, "hidden"),
        ({"hidden": (16, 0)}, "hidden"),
        ({"dp": "dpsgd", "target_epsilon": 1.0, "dp_negative_clip_power": -0.1}, "dp_negative_clip_power"),
        ({"dp": "dpsgd", "target_epsilon": 1.0, "dp_negative_clip_power": 1.5}, "dp_negative_clip_power"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        FederationConfig(**kwargs)  # type: ignore[arg-type]


def test_cli_hidden_widths() -> None:
    assert _hidden_widths("64,32") == (64, 32)
    assert _hidden_widths("") == ()
    with pytest.raises(click.BadParameter, match="64,32"):
        _hidden_widths("wide")
