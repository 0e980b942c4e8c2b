"""The method plug-in interface: every hook is called by ``fit`` and its state is checkpointed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.methods import METHODS, MethodConfig, MethodContext, StepState, TrainMethod
from vitquant.train import TrainConfig, fit
from vitquant.train.checkpoint import load_checkpoint


@dataclass
class _HookConfig(MethodConfig):
    penalty_weight: float = 0.01


@METHODS.register("hook-test")
class _HookMethod(TrainMethod):
    """Adds one learnable scalar trained by its own optimizer, with a penalty on it."""

    name = "hook-test"
    Config = _HookConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.calls: dict[str, int] = {}

    def _hit(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def prepare_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self._hit("prepare_model")
        assert ctx.num_classes == 10 and ctx.calib_loader is not None
        model.register_parameter("toy_scale", nn.Parameter(torch.ones(())))
        return model

    def param_groups(self, model: nn.Module, base_lr: float, wd: float) -> list[dict[str, Any]]:
        self._hit("param_groups")
        params = [p for n, p in model.named_parameters() if n != "toy_scale"]
        return [{"params": params, "weight_decay": wd}]

    def extra_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        self._hit("extra_optimizers")
        return [torch.optim.SGD([model.toy_scale], lr=0.5)]

    def loss(
        self, outputs: Tensor, targets: Tensor, inputs: Tensor, state: StepState
    ) -> tuple[Tensor, dict[str, float]]:
        self._hit("loss")
        assert 0.0 <= state.progress < 1.0
        return state.criterion(inputs, outputs, targets)

    def penalty(self, model: nn.Module) -> Tensor:
        self._hit("penalty")
        return self.config.penalty_weight * model.toy_scale**2

    def on_step_end(self, model: nn.Module, state: StepState) -> None:
        self._hit("on_step_end")

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self._hit("on_epoch_end")
        return {"toy_scale": float(model.toy_scale.detach())}

    def checkpoint_extra_state(self) -> dict[str, Any]:
        return {"calls": dict(self.calls)}

    def eval_model(self, model: nn.Module) -> nn.Module:
        self._hit("eval_model")
        return model


def test_all_hooks_are_used_and_state_is_saved(tmp_path: Path) -> None:
    cfg = TrainConfig(
        model="vit_nano_patch4_28",
        data_path="digits",
        epochs=2,
        batch_size=32,
        train_subset=128,
        eval_subset=64,
        method="hook-test",
        method_args={"penalty_weight": 0.5},
    )
    method = METHODS.get("hook-test")(_HookConfig(penalty_weight=0.5))
    fit(cfg, exp_dir=tmp_path, method=method, quiet=True)
    steps = 2 * 4
    assert method.calls["loss"] == method.calls["penalty"] == method.calls["on_step_end"] == steps
    assert method.calls["on_epoch_end"] == method.calls["eval_model"] == 2
    assert method.calls["prepare_model"] == method.calls["extra_optimizers"] == 1
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logs] == [1, 2]
    assert all("toy_scale" in r and r["train_penalty"] > 0 for r in logs)
    # the penalty (and only it) pulls toy_scale toward 0 through the extra optimizer
    assert logs[1]["toy_scale"] < logs[0]["toy_scale"] < 1.0
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["method"]["calls"]["loss"] == steps
    assert len(state["optimizers"]) == 2 and "toy_scale" in state["model"]
    assert state["config"]["method_args"] == {"penalty_weight": 0.5}
