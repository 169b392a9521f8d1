"""The operator's modules keep no state of their own: it is made at start-up and handed over
through Kopf's memo, so two operators in one process (or a test) never share it."""

from __future__ import annotations

import importlib
import pkgutil
import types

import kopf

import difftrain_operator
from difftrain_operator import startup
from difftrain_operator.checks import ClusterChecks
from difftrain_operator.children import ChildCreator
from difftrain_operator.kueue import Workloads
from difftrain_operator.metrics import PhaseTracker
from difftrain_operator.refresh import StatusRefresher
from difftrain_operator.status_writer import StatusWriter

MUTABLE = (dict, list, set, bytearray)
STATE_CLASSES: tuple[type, ...] = (
    ClusterChecks,
    ChildCreator,
    PhaseTracker,
    StatusRefresher,
    StatusWriter,
    Workloads,
    startup.OperatorState,
)


def _modules() -> list[types.ModuleType]:
    names = [m.name for m in pkgutil.iter_modules(difftrain_operator.__path__)]
    return [importlib.import_module(f"difftrain_operator.{n}") for n in names]


def test_no_module_holds_mutable_state():
    found = []
    for module in _modules():
        for attr, value in vars(module).items():
            if attr.startswith("__"):
                continue
            if isinstance(value, MUTABLE + STATE_CLASSES):
                found.append(f"{module.__name__}.{attr}")
    assert found == []


def test_the_startup_handler_puts_the_state_into_the_memo(monkeypatch):
    memo = kopf.Memo()
    state = startup.OperatorState.build(startup.operator_settings({}), kube=None)  # type: ignore[arg-type]
    memo[startup.MEMO_KEY] = state
    # what Kopf hands a resource's handlers: a shallow copy, sharing the operator's objects
    assert startup.OperatorState.of(memo.__class__(memo)) is state
    assert state.refresher.writer is state.writer


def test_settings_come_from_the_charts_environment():
    settings = startup.operator_settings(
        {"DIFFTRAIN_PRICE_PER_GPU_HOUR": "2.5", "DIFFTRAIN_TRAINER_IMAGE": "t:1"}
    )
    assert settings.price_per_gpu_hour == 2.5
    assert settings.trainer_image == "t:1"
    assert settings.trainer_max_grace_seconds is None
