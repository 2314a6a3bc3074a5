"""The package's one instrumentation of a forward pass (units/trace.py) and its views."""

from __future__ import annotations

import ast
import gc
import threading
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from captum_chains.pathways.neurons import ActivationTracer, discover_neurons
from captum_chains.units.trace import Instrumented, trace_forward

PACKAGE = Path(__file__).resolve().parents[1] / "captum_chains"


class Events:
    """A CallView that records what it is told and replaces nothing."""

    def __init__(self) -> None:
        self.modules: list[tuple[str, str]] = []
        self.functions: list[str] = []

    def enter_module(self, name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.modules.append(("enter", name))

    def exit_module(self, name: str, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        self.modules.append(("exit", name))

    def torch_function(self, func: Any, args: Any, kwargs: Any, result: Any) -> Any:
        self.functions.append(getattr(func, "__name__", ""))
        return result


class DoubleRelu(Events):
    """Replaces every ReLU output ``r`` by ``2 r``."""

    def torch_function(self, func: Any, args: Any, kwargs: Any, result: Any) -> Any:
        super().torch_function(func, args, kwargs, result)
        return result * 2 if func is F.relu or func is torch.relu else result


class Small(nn.Module):
    """An ``nn.ReLU`` module and a functional ``torch.relu``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(self.act(h).mean(dim=(2, 3)))


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")


class Interrupt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


class Failing(nn.Module):
    """Fails inside a submodule, with the instrumentation active."""

    def __init__(self, error: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.inner = nn.Sequential(nn.ReLU(), error)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.conv(x))


class CatchesErrors(nn.Module):
    """Calls a failing submodule and carries on, then a functional ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.fragile = nn.Sequential(nn.Identity(), Boom())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            x = self.fragile(x)
        except ValueError:
            pass
        return F.relu(self.conv(x))


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("error", [Boom, Interrupt])
@pytest.mark.parametrize("reader", ["instrumented", "trace_forward", "tracer"])
def test_hooks_and_mode_are_removed_when_the_forward_raises(error, reader):
    model = Failing(error())
    x = make_inputs(2)
    expected = ValueError if error is Boom else KeyboardInterrupt
    with pytest.raises(expected):
        if reader == "instrumented":
            with Instrumented(model, Events(), root=True) as instrumented:
                instrumented.run(x)
        elif reader == "trace_forward":
            trace_forward(model, (x,))
        else:
            with ActivationTracer(model) as tracer:
                tracer.run((x,))
    assert _hooks_left(model) == 0
    assert _get_current_function_mode_stack() == []
    assert torch.is_grad_enabled()


def test_the_mode_is_active_only_while_the_model_runs():
    model, view = Small(), Events()
    x = make_inputs(2)
    with Instrumented(model, view) as instrumented:
        assert _hooks_left(model) == 2 * (len(list(model.modules())) - 1)  # root=False
        assert _get_current_function_mode_stack() == []
        torch.relu(x)  # outside run(): not reported
        assert view.functions == []
        instrumented.run(x)
        assert _get_current_function_mode_stack() == []
    assert _hooks_left(model) == 0
    assert "relu" in view.functions and "conv2d" in view.functions
    assert [e for e in view.modules if e[0] == "enter"] == [
        ("enter", "conv"),
        ("enter", "act"),
        ("enter", "fc"),
    ]
    with pytest.raises(RuntimeError, match="context open"):
        instrumented.run(x)


def test_root_reports_the_model_itself_as_module_with_empty_name():
    view = Events()
    with Instrumented(Small(), view, root=True) as instrumented:
        instrumented.run(make_inputs(1))
    assert view.modules[0] == ("enter", "") and view.modules[-1] == ("exit", "")


def test_the_instrumentation_acts_only_in_its_own_thread():
    model, view = Small(), DoubleRelu()
    x = make_inputs(2)
    with torch.no_grad():
        reference = model(x)
    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        with torch.no_grad():
            seen["out"] = model(x)

    class StartsAThread(DoubleRelu):
        """While the model runs under the mode, another thread runs it plainly."""

        def torch_function(self, func: Any, args: Any, kwargs: Any, result: Any) -> Any:
            if "during" not in seen:
                thread = threading.Thread(target=other)
                thread.start()
                thread.join(timeout=60)
                seen["during"] = seen.pop("out")
            return super().torch_function(func, args, kwargs, result)

    with Instrumented(model, view) as instrumented, torch.no_grad():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=60)
        assert view.modules == [] and view.functions == []  # hooks left alone elsewhere
        assert torch.equal(seen["out"], reference)
    busy = StartsAThread()
    with Instrumented(model, busy) as instrumented, torch.no_grad():
        changed = instrumented.run(x)
    assert torch.equal(seen["during"], reference)
    assert not torch.equal(changed, reference)
    # the other thread's calls were not reported: one pass of the model's own calls
    assert busy.modules == [(e, n) for n in ("conv", "act", "fc") for e in ("enter", "exit")]


def test_a_replacing_view_changes_the_output_like_the_manual_computation():
    model, x = Small(), make_inputs(3)
    with Instrumented(model, DoubleRelu()) as instrumented:
        out = instrumented.run(x)
    h = torch.relu(model.conv(x)) * 2
    manual = model.fc((F.relu(h) * 2).mean(dim=(2, 3)))
    assert torch.equal(out, manual)
    assert out.requires_grad  # gradient mode is the caller's


def test_exit_on_error_keeps_the_module_stack_when_the_model_catches_an_error():
    (site,) = discover_neurons(CatchesErrors(), make_inputs(1))
    assert site.name == "<model>:relu" and site.module == ""


def test_the_frame_walk_skips_the_tracer_files():
    sites = discover_neurons(Small(), make_inputs(1))
    assert [s.name for s in sites] == ["<model>:relu", "act"]
    functional, module = sites
    line = Small.forward.__code__.co_firstlineno + 1
    assert functional.location == f"test_instrumentation.py:{line}"
    # nn.ReLU called by the model's own forward: the calling line is the model's
    assert module.location == f"test_instrumentation.py:{line + 1}"
    # an nn.ReLU run only by torch code (Sequential) up to the model call: no location
    sequential = discover_neurons(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()), make_inputs(1))
    assert [(s.name, s.location) for s in sequential] == [("1", None)]


_OPAQUE = (nn.Module, type, types.ModuleType, types.FunctionType)


def _tensors_held(root: object) -> int:
    """Tensors reachable from ``root``, not through modules (weights), classes or functions."""
    seen, stack, count = {id(root)}, [root], 0
    while stack:
        for ref in gc.get_referents(stack.pop()):
            if id(ref) in seen or isinstance(ref, _OPAQUE):
                continue
            seen.add(id(ref))
            if isinstance(ref, torch.Tensor):
                count += 1
            stack.append(ref)
    return count


def test_activation_tracer_holds_no_tensor_of_past_passes():
    model = make_model("residual")
    x = make_inputs(2).requires_grad_(True)
    outputs: list[weakref.ref] = []

    def keep_weakly(index: int, out: torch.Tensor) -> torch.Tensor:
        outputs.append(weakref.ref(out))
        return out * 1.0

    held = []
    with ActivationTracer(model) as tracer:
        for _ in range(6):
            y = tracer.run((x,), (), keep_weakly)
            y.sum().backward()
            del y
            held.append(_tensors_held(tracer))
        gc.collect()
        assert held == [held[0]] * len(held)
        assert held[0] == 0
        assert outputs and all(ref() is None for ref in outputs)


def test_one_torch_function_mode_in_the_package():
    subclasses = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if bases & {"TorchFunctionMode", "TorchDispatchMode"}:
                    subclasses.append((path.relative_to(PACKAGE).as_posix(), node.name))
    assert subclasses == [("units/trace.py", "_Mode")]
