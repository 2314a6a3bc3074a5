"""NeuroChains: extract the local reasoning chain of a model on a region of inputs.

Wang, Zhou and Bilmes, "NeuroChains: Extract Local Reasoning Chains of Deep Neural
Nets", TMLR 2022. For inputs x of one local region, with p = softmax(F(x; W)):

1. optimize scores S (init 1, one per unit) and gate parameters alpha (init 0, gates
   G = sigmoid(alpha / T)) with Adam on
   ``KL(p || softmax(F(x; W * S, G))) + lambda * ||S||_1 + lambda_g * penalty(alpha)``
   (Eq. 8), scores projected onto S >= 0 after each step, stopping early when the loss
   changes by less than ``early_stop_delta``;
2. threshold: units with S < tau and gates with G < 0.5 are removed (Eq. 4);
3. if the thresholded network's KL exceeds t, fine-tune the surviving scores on the KL
   alone.

Everything runs for K regions at once (``attribute_many``): each region has its own
scores and gates, its own loss, and its own early stop, so the chains equal K separate
runs.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import nn

from captum_chains._utils.model_state import frozen_eval
from captum_chains._utils.progress import tqdm
from captum_chains._utils.validation import (
    check_conv_rank,
    check_device,
    format_inputs,
    format_target,
)
from captum_chains.config import ChainConfig
from captum_chains.masking import MaskState, apply_masks
from captum_chains.objectives import gate_penalty, kl_divergence, l1_penalty
from captum_chains.result import Chain
from captum_chains.subnetwork import SubNetwork
from captum_chains.units.base import ModelStructure
from captum_chains.units.discovery import discover


class ChainExtractor(Attribution):
    """Extract NeuroChains sub-networks, Captum style.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``[N, C]``. It is never modified: scores and gates
        act through hooks that exist only during a call.
    config : ChainConfig, optional
        Hyperparameters; keyword ``overrides`` replace single fields.

    Examples
    --------
    >>> chain = ChainExtractor(model).attribute(inputs)          # doctest: +SKIP
    >>> print(chain.subnetwork.summary())                        # doctest: +SKIP
    """

    def __init__(
        self, model: nn.Module, config: ChainConfig | None = None, **overrides: Any
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"ChainExtractor needs a torch.nn.Module, got {type(model).__name__}; wrap a "
                "forward function in an nn.Module"
            )
        super().__init__(model)
        self.model = model
        self.config = (
            (config or ChainConfig()).replace(**overrides)
            if overrides
            else (config or ChainConfig())
        )

    def discover(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        additional_forward_args: Any = None,
        layers: Sequence[str] | None = None,
        gates: bool | Sequence[str] = True,
    ) -> ModelStructure:
        """The units and gates NeuroChains would use on ``inputs`` (see :func:`discover`)."""
        items = format_inputs(inputs)
        check_device(self.model, items)
        check_conv_rank(self.model, items)
        extra = _format_additional(additional_forward_args)
        try:
            return discover(
                self.model, tuple(x[:2] for x in items), extra, layers=layers, gates=gates
            )
        except (ValueError, TypeError):
            raise
        except RuntimeError as err:
            raise ValueError(
                f"the model could not run on inputs of shape {[tuple(x.shape) for x in items]}: "
                f"{err}. Check the input shape and preprocessing the model expects"
            ) from err

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: int | list[int] | torch.Tensor | None = None,
        additional_forward_args: Any = None,
        *,
        layers: Sequence[str] | None = None,
        gates: bool | Sequence[str] = True,
        progress: bool = True,
        seed: int | None = None,
        keep_inputs: bool = True,
    ) -> Chain:
        """Extract the chain of ``model`` on one local region.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            The region: ``[N, ...]`` inputs (the paper uses 10-50 images of 1-2 classes).
        target : int, list of int or Tensor, optional
            ``None`` (default): preserve the whole output distribution, the paper's
            objective KL(softmax(F(x; W)) || softmax(F(x; W * S))). Given (Captum formats:
            one int for all inputs, or one class per input): preserve only each input's
            target-class probability, through the binary KL between (p_t, 1 - p_t) and
            (q_t, 1 - q_t); fidelity on other classes is then not optimized.
        additional_forward_args : Any, optional
            Extra positional arguments of the model's forward (Captum convention).
        layers : sequence of str, optional
            Unit layers to score (names or module prefixes); default all discovered.
        gates : bool or sequence of str
            Which gates to optimize (``False``: none).
        progress : bool
            Show a tqdm progress bar with the loss terms and the kept-unit count.
        seed : int, optional
            Seeds torch's RNG for the run (the optimization itself is deterministic).
        keep_inputs : bool
            Store ``inputs`` in the result (for graphs and figures).

        Returns
        -------
        Chain
            Importance, gates, SubNetwork and history.
        """
        items = format_inputs(inputs)
        return self.attribute_many(
            [items],
            target=None if target is None else [target],
            additional_forward_args=additional_forward_args,
            layers=layers,
            gates=gates,
            progress=progress,
            seed=seed,
            keep_inputs=keep_inputs,
        )[0]

    def attribute_many(
        self,
        regions: Sequence[torch.Tensor | tuple[torch.Tensor, ...]] | torch.Tensor,
        target: Sequence[Any] | None = None,
        additional_forward_args: Any = None,
        *,
        layers: Sequence[str] | None = None,
        gates: bool | Sequence[str] = True,
        progress: bool = True,
        seed: int | None = None,
        keep_inputs: bool = True,
    ) -> list[Chain]:
        """Extract K chains, one per region, in one batched optimization.

        Parameters not listed here are as in :meth:`attribute`. The K chains equal those of
        K separate :meth:`attribute` calls up to floating-point rounding.

        Parameters
        ----------
        regions : sequence of Tensor, or Tensor ``[K, B, ...]``
            K regions with the same number B of inputs each.
        target : sequence, optional
            One target per region (each in the formats of :meth:`attribute`), or None.
        """
        if isinstance(regions, torch.Tensor):
            if regions.ndim < 3:
                raise ValueError(
                    f"a regions tensor must have shape [K, B, ...], got {tuple(regions.shape)}"
                )
            regions = list(regions.unbind(0))
        region_items = [format_inputs(r) for r in regions]
        if not region_items:
            raise ValueError("regions is empty; pass at least one region of inputs")
        sizes = {r[0].shape[0] for r in region_items}
        if len(sizes) != 1:
            raise ValueError(
                f"all regions must have the same number of inputs for batched extraction, got "
                f"{sorted(sizes)}; run attribute() per region instead"
            )
        if target is not None and len(target) != len(region_items):
            raise ValueError(
                f"target has {len(target)} entries but there are {len(region_items)} regions"
            )
        if seed is not None:
            torch.manual_seed(seed)
        structure = self.discover(region_items[0], additional_forward_args, layers, gates)
        batch = tuple(torch.cat([r[i] for r in region_items]) for i in range(len(region_items[0])))
        n = region_items[0][0].shape[0]
        targets = None
        if target is not None and any(t is not None for t in target):
            if any(t is None for t in target):
                raise ValueError("give a target for every region or for none")
            targets = torch.cat([format_target(t, n, structure.num_classes) for t in target])
            targets = targets.to(batch[0].device)
        extra = _format_additional(additional_forward_args)
        run = _Optimization(
            self.model, structure, self.config, batch, extra, len(region_items), targets
        )
        chains = run.run(progress=progress)
        if keep_inputs:
            for chain, items in zip(chains, region_items):
                chain.inputs = items[0].detach()
        return chains


def _compiled(model: nn.Module, option: bool | str) -> Callable[..., Any]:
    """The model's forward, through ``torch.compile`` when asked (hooks are traced too)."""
    if option is False:
        return model
    backend = "inductor" if option is True else option

    def forward(*args: Any) -> Any:
        return model(*args)

    return torch.compile(forward, backend=backend)


def _format_additional(args: Any) -> tuple[Any, ...]:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


class _Optimization:
    """One NeuroChains run over K regions: optimize, threshold, fine-tune."""

    def __init__(
        self,
        model: nn.Module,
        structure: ModelStructure,
        config: ChainConfig,
        batch: tuple[torch.Tensor, ...],
        extra: tuple[Any, ...],
        regions: int,
        targets: torch.Tensor | None,
    ) -> None:
        self.model, self.structure, self.config = model, structure, config
        self.batch, self.extra, self.k, self.targets = batch, extra, regions, targets
        self.l1_weight, self.gate_weight = config.penalties(structure.family)
        self.offsets = structure.offsets()
        device = batch[0].device
        self.device = device
        with frozen_eval(model), torch.no_grad():
            logits = model(*batch, *extra)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError("the model must return logits of shape [N, num_classes]")
        self.log_p = F.log_softmax(logits.float(), dim=1)
        self.forward = _compiled(model, config.compile)
        self.start = time.perf_counter()
        self.histories: list[list[dict[str, Any]]] = [[] for _ in range(regions)]

    # -- mask views ---------------------------------------------------------
    def _state(
        self, scores: torch.Tensor, gates: torch.Tensor | None, state: MaskState, hard: bool = False
    ) -> None:
        """Point the hooks at the current scores and gates.

        With ``hard=True`` (0/1 gates after thresholding), gates open in every region are
        left out, so that an open layer runs exactly as in the original model.
        """
        single = self.k == 1
        state.scores = {
            name: scores[0, a:b] if single else scores[:, a:b]
            for name, (a, b) in self.offsets.items()
        }
        if gates is None:
            state.gates = {}
        else:
            state.gates = {
                g.name: gates[0, i] if single else gates[:, i]
                for i, g in enumerate(self.structure.gates)
                if not (hard and bool((gates[:, i] == 1).all()))
            }

    def _forward_kl(
        self, state: MaskState, scores: torch.Tensor, gates: torch.Tensor | None, hard: bool = False
    ) -> torch.Tensor:
        self._state(scores, gates, state, hard)
        with self._autocast():
            try:
                logits = self.forward(*self.batch, *self.extra)
            except Exception as err:
                if self.forward is self.model:
                    raise
                warnings.warn(f"torch.compile failed ({err!r}); running eagerly", stacklevel=2)
                self.forward = self.model
                logits = self.model(*self.batch, *self.extra)
        return kl_divergence(self.log_p, logits.float(), self.k, self.targets)

    def _autocast(self) -> Any:
        """``torch.autocast`` in the configured dtype, or a no-op context."""
        dtype = self.config.autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype))

    # -- phases -------------------------------------------------------------
    def run(self, progress: bool) -> list[Chain]:
        cfg = self.config
        units, n_gates = self.structure.total_units, len(self.structure.gates)
        use_gates = cfg.use_gates and n_gates > 0
        scores = torch.full((self.k, units), cfg.score_init, device=self.device, requires_grad=True)
        alphas = torch.full(
            (self.k, n_gates), cfg.alpha_init, device=self.device, requires_grad=use_gates
        )
        state = MaskState()
        # BatchNorm folding swaps parameters inside hooks, which torch.compile would guard on
        fold = not cfg.compile
        with apply_masks(self.model, self.structure, state, freeze=True, fold_norms=fold):
            self._optimize(state, scores, alphas, use_gates, progress)
            final, gates_open, soft = self._threshold(scores.detach(), alphas.detach(), use_gates)
            kl = self._hard_kl(state, final, gates_open)
            needs = kl > cfg.finetune_kl
            if needs.any() and cfg.finetune_steps > 0:
                final = self._finetune(state, final, gates_open, needs, progress)
                kl = self._hard_kl(state, final, gates_open)
        return [
            self._chain(r, final[r], gates_open[r], soft[r], float(kl[r]), bool(needs[r]))
            for r in range(self.k)
        ]

    def _optimize(
        self,
        state: MaskState,
        scores: torch.Tensor,
        alphas: torch.Tensor,
        use_gates: bool,
        progress: bool,
    ) -> None:
        cfg = self.config
        params = [scores, alphas] if use_gates else [scores]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        active = torch.ones(self.k, dtype=torch.bool, device=self.device)
        recent: list[torch.Tensor] = []
        bar = tqdm(range(cfg.steps), desc="NeuroChains", disable=not progress, leave=False)
        for step in bar:
            gates = torch.sigmoid(alphas / cfg.temperature) if use_gates else None
            kl = self._forward_kl(state, scores, gates)
            l1 = l1_penalty(scores)
            gp = (
                gate_penalty(alphas, cfg.temperature, cfg.gate_penalty_on)
                if use_gates
                else torch.zeros_like(l1)
            )
            loss = kl + self.l1_weight * l1 + self.gate_weight * gp
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            frozen = (~active).nonzero().flatten()
            before = [p.detach()[frozen].clone() for p in params] if len(frozen) else None
            optimizer.step()
            with torch.no_grad():
                scores.clamp_(min=0)
                if before is not None:
                    for p, b in zip(params, before):
                        p[frozen] = b
            means = self._log("optimize", step, loss, kl, l1, gp, scores, alphas, use_gates, active)
            if progress:
                bar.set_postfix(
                    kl=f"{means['kl']:.4f}",
                    l1=f"{means['l1']:.1f}",
                    gate=f"{means['gate_penalty']:.2f}",
                    kept=int(means["kept"]),
                )
            recent = [*recent[-cfg.early_stop_window :], loss.detach()]
            if step + 1 >= max(cfg.early_stop_min_steps, cfg.early_stop_window + 1):
                active &= (recent[0] - recent[-1]).abs() >= cfg.early_stop_delta
            if not active.any():
                break
        bar.close()

    def _threshold(
        self, scores: torch.Tensor, alphas: torch.Tensor, use_gates: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        soft = torch.sigmoid(alphas / cfg.temperature) if use_gates else torch.ones_like(alphas)
        gates_open = soft >= cfg.gate_threshold
        final = torch.where(scores >= cfg.score_threshold, scores, torch.zeros_like(scores))
        for i, gate in enumerate(self.structure.gates):
            closed = ~gates_open[:, i]
            for unit in gate.units:
                a, b = self.offsets[unit]
                final[closed, a:b] = 0
        return final, gates_open, soft

    def _hard_gates(self, gates_open: torch.Tensor) -> torch.Tensor | None:
        if gates_open.shape[1] == 0:
            return None
        return gates_open.float()

    def _hard_kl(
        self, state: MaskState, final: torch.Tensor, gates_open: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            return self._forward_kl(state, final, self._hard_gates(gates_open), hard=True)

    def _finetune(
        self,
        state: MaskState,
        final: torch.Tensor,
        gates_open: torch.Tensor,
        needs: torch.Tensor,
        progress: bool,
    ) -> torch.Tensor:
        cfg = self.config
        keep = (final > 0) & needs.view(-1, 1)
        scores = final.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([scores], lr=cfg.finetune_lr)
        hard = self._hard_gates(gates_open)
        bar = tqdm(range(cfg.finetune_steps), desc="fine-tune", disable=not progress, leave=False)
        zeros = torch.zeros_like(final[:, :0])
        for step in bar:
            kl = self._forward_kl(state, scores, hard, hard=True)
            optimizer.zero_grad(set_to_none=True)
            kl.sum().backward()
            assert scores.grad is not None
            scores.grad.mul_(keep)
            optimizer.step()
            with torch.no_grad():
                scores.clamp_(min=0)
                scores.copy_(torch.where(keep, scores, final))
            means = self._log(
                "finetune", step, kl, kl, zeros.sum(1), zeros.sum(1), scores, None, False, needs
            )
            if progress:
                bar.set_postfix(kl=f"{means['kl']:.4f}")
        bar.close()
        return scores.detach()

    # -- bookkeeping --------------------------------------------------------
    def _log(
        self,
        phase: str,
        step: int,
        loss: torch.Tensor,
        kl: torch.Tensor,
        l1: torch.Tensor,
        gp: torch.Tensor,
        scores: torch.Tensor,
        alphas: torch.Tensor | None,
        use_gates: bool,
        active: torch.Tensor,
    ) -> dict[str, float]:
        """Append each active region's step to its history; return the means over regions
        of ``kl``, ``l1``, ``gate_penalty`` and ``kept`` (for the progress bar)."""
        cfg = self.config
        with torch.no_grad():
            kept = (scores >= cfg.score_threshold).sum(1).tolist()
            open_gates = (
                (alphas >= cfg.temperature * torch.logit(torch.tensor(cfg.gate_threshold)))
                .sum(1)
                .tolist()
                if use_gates and alphas is not None
                else [len(self.structure.gates)] * self.k
            )
            kls, l1s, gps = kl.tolist(), l1.tolist(), gp.tolist()
            rows = zip(loss.tolist(), kls, l1s, gps, kept, open_gates, active.tolist())
        now = time.perf_counter() - self.start
        for r, (lo, k, l1, g, kp, og, act) in enumerate(rows):
            if act:
                self.histories[r].append(
                    {
                        "phase": phase,
                        "step": step,
                        "loss": lo,
                        "kl": k,
                        "l1": l1,
                        "gate_penalty": g,
                        "kept": kp,
                        "open_gates": og,
                        "time": now,
                    }
                )
        return {
            name: sum(values) / len(values)
            for name, values in (("kl", kls), ("l1", l1s), ("gate_penalty", gps), ("kept", kept))
        }

    def _chain(
        self,
        region: int,
        final: torch.Tensor,
        gates_open: torch.Tensor,
        soft: torch.Tensor,
        kl: float,
        finetuned: bool,
    ) -> Chain:
        subnetwork = SubNetwork(self.model, self.structure, final, gates_open)
        l1, lg = self.l1_weight, self.gate_weight
        return Chain(
            importance=subnetwork.importance,
            gates={g.name: float(v) for g, v in zip(self.structure.gates, soft.tolist())},
            subnetwork=subnetwork,
            history=self.histories[region],
            structure=self.structure,
            config=self.config.replace(l1=l1, gate_penalty=lg),
            kl=kl,
            finetuned=finetuned,
        )
