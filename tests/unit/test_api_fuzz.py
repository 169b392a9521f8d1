"""Whatever JSON arrives, the API model answers with a SpecError naming fields."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difftrain import api


@pytest.mark.parametrize("kind", ["DiffusionTrainingJob", "ModelMerge"])
def test_model_errors_on_arbitrary_json_are_clear(kind):
    """Whatever JSON arrives, the model answers with a SpecError, not another exception."""
    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "uri",
                        "method",
                        "spec",
                        "models",
                        "lora",
                        "dataset",
                        "baseModel",
                        "output",
                        "x",
                    ]
                ),
                children,
                max_size=4,
            )
        ),
        max_leaves=12,
    )

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(
        spec=st.dictionaries(
            st.sampled_from(
                [
                    "baseModel",
                    "dataset",
                    "output",
                    "method",
                    "lora",
                    "models",
                    "hyperparameters",
                    "resources",
                    "storage",
                    "base",
                    "alpha",
                ]
            ),
            json_values,
            max_size=6,
        )
    )
    def check(spec: dict[str, Any]) -> None:
        try:
            api.parse_spec(kind, spec)
        except api.SpecError as err:
            assert all(line.startswith("spec") for line in err.errors), err.errors

    check()
