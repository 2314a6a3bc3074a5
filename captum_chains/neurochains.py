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
import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import nn

from captum_chains._utils.layout import to_channels_last, to_contiguous, use_channels_last
from captum_chains._utils.model_state import ConcurrentUseError, eval_mode
from captum_chains._utils.progress import tqdm
from captum_chains._utils.validation import (
    check_conv_rank,
    check_device,
    format_additional_args,
    format_inputs,
    format_target,
    index_batch,
    repeat_additional_args,
    slice_additional_args,
)
from captum_chains.config import ChainConfig
from captum_chains.masking import MaskState, apply_masks
from captum_chains.objectives import gate_penalty, kl_divergence, l1_penalty
from captum_chains.optim import FREE_LR_CAP, ProximalAdam, two_phase_schedule
from captum_chains.path import ChainPath, FidelityTarget, PathPoint
from captum_chains.result import Chain
from captum_chains.subnetwork import SubNetwork, weights_digest
from captum_chains.units.base import ModelStructure
from captum_chains.units.discovery import discover

if TYPE_CHECKING:  # imported when first used: the export machinery is large
    from captum_chains.export.compact import CompactProgram


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
        extra = format_additional_args(additional_forward_args)
        try:
            n = items[0].shape[0]
            return discover(
                self.model,
                tuple(x[:2] for x in items),
                slice_additional_args(extra, n, 0, 2),
                layers=layers,
                gates=gates,
            )
        except (ValueError, TypeError, ConcurrentUseError):
            raise
        except RuntimeError as err:
            raise ValueError(
                f"the model could not run on inputs of shape {[tuple(x.shape) for x in items]}: "
                f"{err}. Check the input shape and preprocessing the model expects"
            ) from err

    def _structure(
        self,
        items: tuple[torch.Tensor, ...],
        additional_forward_args: Any,
        layers: Sequence[str] | None,
        gates: bool | Sequence[str],
    ) -> ModelStructure:
        """Discovered structure, without single-layer gates unless the config asks for them
        (gates named explicitly in ``gates`` are always kept)."""
        structure = self.discover(items, additional_forward_args, layers, gates)
        if gates is True and not self.config.layer_gates:
            kept = tuple(g for g in structure.gates if g.kind != "layer")
            if len(kept) != len(structure.gates):
                structure = dataclasses.replace(structure, gates=kept)
        return structure

    def attribute(  # type: ignore[override]  # Captum: each method's own signature
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
        fidelity: FidelityTarget | float | Mapping[str, float] | None = None,
        path_l1: Sequence[float] | None = None,
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
            Extra positional arguments of the model's forward (Captum convention): a
            tensor whose first dimension is the number of inputs N is per-example and
            follows its inputs; anything else is passed unchanged to every call.
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
        fidelity : FidelityTarget, float or dict, optional
            The fidelity the chain must keep on the region: a :class:`FidelityTarget`, a
            minimum top-1 agreement (``fidelity=1.0``) or a dict of its fields. Given, the
            extractor computes the sparsity-fidelity :meth:`path` around the family's
            lambda and returns the sparsest chain on it that meets the target (fine-tuned
            when its KL exceeds ``finetune_kl`` and the fine-tuned chain still meets it).
            If no chain on the path meets it, the densest one is returned with a warning.
        path_l1 : sequence of float, optional
            The lambdas of that path (see :meth:`path`); default: the family's grid.

        Returns
        -------
        Chain
            Importance, gates, SubNetwork and history.
        """
        items = format_inputs(inputs)
        if fidelity is not None:
            target_spec = FidelityTarget.coerce(fidelity)
            _, chain = self._path(
                items,
                target,
                additional_forward_args,
                layers=layers,
                gates=gates,
                progress=progress,
                seed=seed,
                keep_inputs=keep_inputs,
                fidelity=target_spec,
                l1=path_l1,
            )
            assert chain is not None
            return chain
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

    def path(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: int | list[int] | torch.Tensor | None = None,
        additional_forward_args: Any = None,
        *,
        l1: Sequence[float] | None = None,
        points: int = 8,
        point_steps: int | None = None,
        layers: Sequence[str] | None = None,
        gates: bool | Sequence[str] = True,
        progress: bool = True,
        seed: int | None = None,
        keep_inputs: bool = True,
    ) -> ChainPath:
        """The sparsity-fidelity path of one region: a chain per lambda, in one run.

        The first lambda is solved from the start (``config.steps`` steps); every next,
        larger lambda continues from the previous solution for ``point_steps`` steps with
        the removed units and closed gates kept removed (nested chains). Each point's
        thresholded sub-network is evaluated on the region (KL, top-1 agreement, mean
        drop of the model's class); nothing is fine-tuned.

        Parameters
        ----------
        inputs, target, additional_forward_args, layers, gates, progress, seed, keep_inputs
            As in :meth:`attribute`.
        l1 : sequence of float, optional
            The lambdas, sorted increasingly; default ``points`` values spaced
            geometrically from half to four times the family's (or the config's) lambda.
        points : int
            Number of default lambdas (ignored when ``l1`` is given).
        point_steps : int, optional
            Steps per point after the first; default ``max(4, config.steps // 8)``, so a
            path of 8 points costs under twice one chain.

        Returns
        -------
        ChainPath
            The chains and their fidelity; ``.sparsest(fidelity)``, ``.plot()``,
            ``.to_frame()``.
        """
        path, _ = self._path(
            format_inputs(inputs),
            target,
            additional_forward_args,
            l1=l1,
            points=points,
            point_steps=point_steps,
            layers=layers,
            gates=gates,
            progress=progress,
            seed=seed,
            keep_inputs=keep_inputs,
        )
        return path

    def _path(
        self,
        items: tuple[torch.Tensor, ...],
        target: Any,
        additional_forward_args: Any,
        *,
        l1: Sequence[float] | None = None,
        points: int = 8,
        point_steps: int | None = None,
        layers: Sequence[str] | None = None,
        gates: bool | Sequence[str] = True,
        progress: bool = True,
        seed: int | None = None,
        keep_inputs: bool = True,
        fidelity: FidelityTarget | None = None,
    ) -> tuple[ChainPath, Chain | None]:
        if seed is not None:
            torch.manual_seed(seed)
        structure = self._structure(items, additional_forward_args, layers, gates)
        n = items[0].shape[0]
        targets = None
        if target is not None:
            targets = format_target(target, n, structure.num_classes).to(items[0].device)
        run = _Optimization(
            self.model,
            structure,
            self.config,
            items,
            format_additional_args(additional_forward_args),
            1,
            targets,
        )
        lambdas = _path_lambdas(l1, points, run.l1_weight)
        steps = max(4, self.config.steps // 8) if point_steps is None else point_steps
        if steps < 1:
            raise ValueError(f"point_steps must be >= 1, got {steps}")
        path = run.run_path(lambdas, steps, progress)
        chosen = None
        if fidelity is not None:
            chosen = run.select(path, fidelity, progress)
        if keep_inputs:
            for point in path:
                point.chain.inputs = items[0].detach()
            if chosen is not None:
                chosen.inputs = items[0].detach()
        return path, chosen

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
        K separate :meth:`attribute` calls up to floating-point rounding. With compact steps
        (``ChainConfig.compact_below``, the default) the regions run one after another,
        each on its own compact copy of the model (their live filters differ); with
        ``compact_below=None`` every step runs the K regions in one batch.

        Parameters
        ----------
        regions : sequence of Tensor, or Tensor ``[K, B, ...]``
            K regions with the same number B of inputs each.
        target : sequence, optional
            One target per region (each in the formats of :meth:`attribute`), or None.
        additional_forward_args : Any, optional
            As in :meth:`attribute`; per-example tensors have first dimension B and are
            used with every region's inputs.
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
        structure = self._structure(region_items[0], additional_forward_args, layers, gates)
        n = region_items[0][0].shape[0]
        targets = None
        if target is not None and any(t is not None for t in target):
            if any(t is None for t in target):
                raise ValueError("give a target for every region or for none")
            targets = torch.cat([format_target(t, n, structure.num_classes) for t in target])
            targets = targets.to(region_items[0][0].device)
        if self.config.compact_below is not None and len(region_items) > 1:
            extra = format_additional_args(additional_forward_args)
            chains = []
            for r, items in enumerate(region_items):
                region_targets = None if targets is None else targets[r * n : (r + 1) * n]
                run = _Optimization(
                    self.model, structure, self.config, items, extra, 1, region_targets
                )
                chains += run.run(progress=progress)
        else:
            width = len(region_items[0])
            batch = tuple(torch.cat([r[i] for r in region_items]) for i in range(width))
            # per-example extra arguments (first dimension B) go with every region's inputs
            extra = repeat_additional_args(
                format_additional_args(additional_forward_args), n, len(region_items)
            )
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


def _check_finite(kl: torch.Tensor, step: int) -> None:
    """Raise if the masked model's KL is inf/NaN (its logits overflowed under the masks)."""
    if not bool(torch.isfinite(kl).all()):
        raise ValueError(
            f"the KL divergence became {kl.tolist()} at optimization step {step}: the scored "
            "model's logits overflow. Check the inputs' scale, or lower ChainConfig.lr"
        )


def _set_gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    """``p.grad = d loss / d p`` for the optimized tensors only.

    ``torch.autograd.grad`` rather than ``backward()``: the model's own parameters keep
    ``requires_grad`` as the user set it and never receive a ``.grad`` (no weight
    gradient is computed either: autograd only runs the paths to ``params``).
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g


def _warn_if_input_independent(logits: torch.Tensor, regions: int) -> None:
    """Warn about regions whose thresholded sub-network gives every input the same logits:
    a layer keeps no filter that varies with the input, so the chain can reproduce the model
    at most where the model's outputs barely vary over the region."""
    per_region = logits.detach().float().view(regions, -1, logits.shape[-1])
    if per_region.shape[1] < 2:
        return
    spread = (per_region - per_region[:, :1]).abs().amax(dim=(1, 2))
    scale = per_region.abs().amax(dim=(1, 2))
    constant = (spread <= 1e-5 * scale + 1e-12).nonzero().flatten().tolist()
    if constant:
        which = "the region" if regions == 1 else f"regions {constant}"
        warnings.warn(
            f"the chain of {which} does not depend on its inputs: the sub-network gives all "
            f"{per_region.shape[1]} inputs the same logits (no kept filter varies with the "
            "input), so it cannot explain them and matches the model at most where the "
            "model's outputs barely vary over the region; use a more varied region (more "
            "inputs, several photos) or a smaller l1 (or lr) for a chain that explains them",
            stacklevel=4,
        )


#: A compact program is rebuilt once its live filters shrink below this fraction of it.
_RECOMPACT = 0.7


def _path_lambdas(l1: Sequence[float] | None, points: int, default: float) -> list[float]:
    """The path's lambdas: given (checked strictly increasing, finite, >= 0) or a geometric
    grid around ``default``."""
    if l1 is None:
        if isinstance(points, bool) or not isinstance(points, int) or points < 2:
            raise ValueError(f"points must be an int >= 2, got {points!r}")
        if not default > 0:
            raise ValueError(
                "the path needs a positive lambda to spread its grid around; pass l1=[...] "
                "or a config with l1 > 0"
            )
        low, high = default / 2, default * 4
        return [low * (high / low) ** (i / (points - 1)) for i in range(points)]
    values = [float(v) for v in l1]
    if len(values) < 1:
        raise ValueError("l1 is empty; pass at least one lambda")
    if any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ValueError(f"every lambda of the path must be a finite number >= 0, got {values}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"the path's lambdas must increase strictly, got {values}; sort them")
    return values


def _keep_removed(
    scores: torch.Tensor,
    alphas: torch.Tensor,
    support: torch.Tensor | None,
    closed_gates: torch.Tensor | None,
    closed_alpha: float,
) -> None:
    """In place: scores outside ``support`` to 0, ``closed_gates`` kept at or below
    ``closed_alpha`` (the nested supports of the path)."""
    if support is not None:
        scores.mul_(support)
    if closed_gates is not None and closed_gates.any():
        alphas.copy_(torch.where(closed_gates, alphas.clamp(max=closed_alpha), alphas))


def _alpha_at_threshold(config: ChainConfig) -> float:
    """The gate parameter whose gate ``sigmoid(alpha / T)`` equals the gate threshold."""
    g = config.gate_threshold
    return config.temperature * math.log(g / (1 - g))


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
        with eval_mode(model), torch.no_grad():
            logits = model(*batch, *extra)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError("the model must return logits of shape [N, num_classes]")
        bad = ~torch.isfinite(logits).all(dim=1)
        if bad.any():
            raise ValueError(
                f"the model's logits are not finite (inf or NaN) for {int(bad.sum())} of "
                f"{len(bad)} inputs (first: input {int(bad.nonzero()[0])}), although the inputs "
                "are finite: the model overflows on them. Check their scale and preprocessing "
                "(e.g. normalization), or run the model in float32/float64"
            )
        self.log_p = F.log_softmax(logits.float(), dim=1)
        # the reference outputs come from the inputs as given; the steps may run channels-last
        self.channels_last = use_channels_last(config.channels_last, batch)
        if self.channels_last:
            self.batch = to_channels_last(batch)
        self.per_region = batch[0].shape[0] // regions
        self.sampler = torch.Generator().manual_seed(config.sample_seed)
        self.forward = _compiled(model, config.compile)
        self.start = time.perf_counter()
        self.histories: list[list[dict[str, Any]]] = [[] for _ in range(regions)]
        self.digest = weights_digest(model)  # once per run, shared by its chains
        self.compact_failed = False

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
        self,
        state: MaskState,
        scores: torch.Tensor,
        gates: torch.Tensor | None,
        hard: bool = False,
        sample: bool = False,
        program: CompactProgram | None = None,
    ) -> torch.Tensor:
        """KL per region of the scored network; on a random subset of each region when
        ``sample`` and ``batch_size`` ask for one (an optimization step). With a compact
        ``program`` (one region) the step runs on it instead of the masked model."""
        inputs, extra, log_p, targets = self._step_inputs() if sample else self._whole()
        with self._autocast():
            if program is None:
                self._state(scores, gates, state, hard)
                logits = self._run_model(inputs, extra)
            else:
                logits = program(scores[0], *inputs)
        return kl_divergence(log_p, logits.float(), self.k, targets)

    def _whole(self) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...], torch.Tensor, Any]:
        return self.batch, self.extra, self.log_p, self.targets

    def _step_inputs(self) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...], torch.Tensor, Any]:
        """Inputs, extra arguments, original log-probabilities and targets of one step:
        ``batch_size`` inputs drawn without replacement from each region."""
        size, n = self.config.batch_size, self.per_region
        if size is None or size >= n:
            return self._whole()
        picks = torch.stack(
            [torch.randperm(n, generator=self.sampler)[:size] for _ in range(self.k)]
        )
        index = (picks + n * torch.arange(self.k).view(-1, 1)).flatten().to(self.device)
        inputs, extra = index_batch(self.batch, self.extra, self.batch[0].shape[0], index)
        targets = None if self.targets is None else self.targets[index]
        return inputs, extra, self.log_p[index], targets

    def _run_model(
        self, inputs: tuple[torch.Tensor, ...] | None = None, extra: tuple[Any, ...] | None = None
    ) -> torch.Tensor:
        inputs = self.batch if inputs is None else inputs
        extra = self.extra if extra is None else extra
        try:
            return self.forward(*inputs, *extra)
        except Exception as err:
            if self.channels_last:
                # e.g. a ``.view`` of a convolution's output: run in the given layout instead
                self.channels_last = False
                self.batch = to_contiguous(self.batch)
                return self._run_model(to_contiguous(inputs), extra)
            if self.forward is self.model:
                raise
            warnings.warn(f"torch.compile failed ({err!r}); running eagerly", stacklevel=2)
            self.forward = self.model
            return self.model(*inputs, *extra)

    def _autocast(self) -> Any:
        """``torch.autocast`` in the configured dtype, or a no-op context."""
        dtype = self.config.autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype))

    # -- phases -------------------------------------------------------------
    @contextlib.contextmanager
    def masked(self) -> Iterator[MaskState]:
        """The model with hooks reading a fresh :class:`MaskState`, inside ``with``."""
        state = MaskState()
        # folding swaps the BatchNorms' class during the run, which torch.compile guards on
        fold = not self.config.compile
        with apply_masks(self.model, self.structure, state, fold_norms=fold):
            yield state

    def initial(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Initial scores ``[K, U]``, gate parameters ``[K, G]`` and whether gates are used."""
        cfg = self.config
        units, n_gates = self.structure.total_units, len(self.structure.gates)
        use_gates = cfg.use_gates and n_gates > 0
        scores = torch.full((self.k, units), cfg.score_init, device=self.device, requires_grad=True)
        alphas = torch.full(
            (self.k, n_gates), cfg.alpha_init, device=self.device, requires_grad=use_gates
        )
        return scores, alphas, use_gates

    def run(self, progress: bool) -> list[Chain]:
        """Optimize, threshold and (where needed) fine-tune every region's chain."""
        scores, alphas, use_gates = self.initial()
        with self.masked() as state:
            self.optimize(state, scores, alphas, use_gates, progress)
            final, gates_open, soft = self.threshold(scores.detach(), alphas.detach(), use_gates)
            return self.finish(state, final, gates_open, soft, progress)

    def finish(
        self,
        state: MaskState,
        final: torch.Tensor,
        gates_open: torch.Tensor,
        soft: torch.Tensor,
        progress: bool,
    ) -> list[Chain]:
        """Fine-tune thresholded scores whose KL exceeds ``finetune_kl``; build the chains."""
        cfg = self.config
        logits = self.hard_logits(state, final, gates_open)
        kl = kl_divergence(self.log_p, logits, self.k, self.targets)
        needs = kl > cfg.finetune_kl
        if needs.any() and cfg.finetune_steps > 0:
            final = self._finetune(state, final, gates_open, needs, progress)
            logits = self.hard_logits(state, final, gates_open)
            kl = kl_divergence(self.log_p, logits, self.k, self.targets)
        _warn_if_input_independent(logits, self.k)
        return [
            self._chain(r, final[r], gates_open[r], soft[r], float(kl[r]), bool(needs[r]))
            for r in range(self.k)
        ]

    def run_path(self, lambdas: Sequence[float], point_steps: int, progress: bool) -> ChainPath:
        """Continuation over increasing lambda with nested supports (one region)."""
        cfg = self.config
        scores, alphas, use_gates = self.initial()
        closed_alpha = _alpha_at_threshold(cfg)
        optimizer = None
        support: torch.Tensor | None = None
        closed = torch.zeros_like(alphas, dtype=torch.bool)
        points = []
        bar = tqdm(lambdas, desc="NeuroChains path", disable=not progress, leave=False)
        with self.masked() as state:
            for i, l1 in enumerate(bar):
                self.l1_weight = float(l1)
                optimizer = self.optimize(
                    state,
                    scores,
                    alphas,
                    use_gates,
                    progress,
                    steps=cfg.steps if i == 0 else point_steps,
                    descent_steps=None if i == 0 else 0,
                    optimizer=optimizer,
                    support=support,
                    closed_gates=closed,
                    desc=f"lambda={l1:.3g}",
                )
                final, gates_open, soft = self.threshold(
                    scores.detach(), alphas.detach(), use_gates
                )
                points.append(self._point(state, final, gates_open, soft))
                support = final > 0
                closed = ~gates_open
                with torch.no_grad():  # before the next point's first forward pass
                    _keep_removed(scores, alphas, support, closed, closed_alpha)
                bar.set_postfix(kept=points[-1].kept, agreement=f"{points[-1].agreement:.2f}")
        bar.close()
        return ChainPath(points)

    def _point(
        self, state: MaskState, final: torch.Tensor, gates_open: torch.Tensor, soft: torch.Tensor
    ) -> PathPoint:
        logits = self.hard_logits(state, final, gates_open)
        kl, agreement, drop = self.fidelity(logits)
        chain = self._chain(0, final[0], gates_open[0], soft[0], kl, False)
        return PathPoint(
            l1=self.l1_weight,
            kept=chain.num_filters,
            total=chain.total_filters,
            kl=kl,
            agreement=agreement,
            mean_drop=drop,
            open_gates=int(gates_open[0].sum()),
            steps=sum(1 for row in self.histories[0] if row["phase"] == "optimize"),
            inputs=int(logits.shape[0]),
            chain=chain,
        )

    def fidelity(self, logits: torch.Tensor) -> tuple[float, float, float]:
        """KL, top-1 agreement and mean drop of the class probability (one region)."""
        kl = float(kl_divergence(self.log_p, logits, 1, self.targets)[0])
        classes = self.log_p.argmax(1) if self.targets is None else self.targets
        agree = logits.argmax(1) == classes
        p = self.log_p.exp().gather(1, classes.view(-1, 1))
        q = F.softmax(logits.float(), dim=1).gather(1, classes.view(-1, 1))
        return kl, float(agree.float().mean()), float((p - q).mean())

    def select(self, path: ChainPath, fidelity: FidelityTarget, progress: bool) -> Chain:
        """The sparsest chain of ``path`` meeting ``fidelity``, fine-tuned when its KL
        exceeds ``finetune_kl`` (kept only if the fine-tuned chain still meets it)."""
        point = path.sparsest(fidelity)
        if point is None:
            point = path.points[0]
            warnings.warn(
                f"no chain on the path meets {fidelity}: the densest one (lambda "
                f"{point.l1:.3g}, agreement {point.agreement:.2f}, KL {point.kl:.3f}, mean "
                f"drop {point.mean_drop:.3f}) is returned; pass smaller lambdas "
                "(path(l1=[...])) or a looser target",
                stacklevel=3,
            )
            return point.chain
        cfg = self.config
        if point.kl <= cfg.finetune_kl or cfg.finetune_steps == 0:
            return point.chain
        sub = point.chain.subnetwork
        final = sub.scores.detach().clone().view(1, -1).to(self.device)
        gates_open = sub.gates_open.detach().clone().view(1, -1).to(self.device)
        self.l1_weight = point.l1
        with self.masked() as state:
            tuned = self._finetune(
                state,
                final,
                gates_open,
                torch.ones(1, dtype=torch.bool, device=self.device),
                progress,
            )
            logits = self.hard_logits(state, tuned, gates_open)
        kl, agreement, drop = self.fidelity(logits)
        candidate = dataclasses.replace(point, kl=kl, agreement=agreement, mean_drop=drop)
        if not fidelity.met_by(candidate):
            return point.chain
        soft = torch.tensor([point.chain.gates[g.name] for g in self.structure.gates]).view(1, -1)
        return self._chain(0, tuned[0], gates_open[0], soft[0], kl, True)

    def _optimizer(
        self, scores: torch.Tensor, alphas: torch.Tensor, use_gates: bool
    ) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "adam":
            return torch.optim.Adam([scores, alphas] if use_gates else [scores], lr=cfg.lr)
        groups: list[dict[str, Any]] = [
            {
                "params": [scores],
                "l1": self.l1_weight,
                "nonnegative": True,
                "free_rate": cfg.free_rate,
                "max_free_lr": FREE_LR_CAP,
            }
        ]
        if use_gates:
            groups.append({"params": [alphas], "l1": 0.0, "nonnegative": False})
        return ProximalAdam(groups, lr=cfg.lr)

    def optimize(
        self,
        state: MaskState,
        scores: torch.Tensor,
        alphas: torch.Tensor,
        use_gates: bool,
        progress: bool,
        *,
        steps: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        support: torch.Tensor | None = None,
        closed_gates: torch.Tensor | None = None,
        descent_steps: int | None = None,
        desc: str = "NeuroChains",
    ) -> torch.optim.Optimizer:
        """Minimize Eq. 8 over ``scores`` and ``alphas`` in place; return the optimizer.

        ``support`` (bool like ``scores``) pins the scores outside it to zero (the nested
        supports of a regularization path); ``optimizer`` continues a previous run's
        moments (warm start); ``descent_steps`` overrides the config's (0 on a warm start:
        the scores are already sorted).
        """
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        proximal = cfg.optimizer == "proximal"
        if optimizer is None:
            optimizer = self._optimizer(scores, alphas, use_gates)
        else:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr
                if group["params"][0] is scores and "l1" in group:
                    group["l1"] = self.l1_weight
        params = [p for g in optimizer.param_groups for p in g["params"]]
        refine = cfg.lr if cfg.refine_lr is None else cfg.refine_lr
        descent = cfg.descent_steps if descent_steps is None else descent_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, two_phase_schedule(descent, refine / cfg.lr)
        )
        active = torch.ones(self.k, dtype=torch.bool, device=self.device)
        recent: list[torch.Tensor] = []
        program: CompactProgram | None = None
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for step in bar:
            if program is None:  # from the first compact step on the gates stay as they are
                gates_open = self._gates_open(alphas, use_gates)
            program = self._compaction(state, scores, gates_open, program)
            gates = torch.sigmoid(alphas / cfg.temperature) if use_gates else None
            kl = self._forward_kl(state, scores, gates, sample=True, program=program)
            _check_finite(kl, step)
            l1 = l1_penalty(scores)
            gp = (
                gate_penalty(alphas, cfg.temperature, cfg.gate_penalty_on)
                if use_gates
                else torch.zeros_like(l1)
            )
            loss = kl + self.l1_weight * l1 + self.gate_weight * gp
            # the proximal step applies the l1 term itself: differentiate the smooth part
            smooth = kl + self.gate_weight * gp if proximal else loss
            _set_gradients(smooth.sum(), params if program is None else [scores])
            if program is not None:
                alphas.grad = None  # the gates are fixed in the compact program
            frozen = (~active).nonzero().flatten()
            before = [p.detach()[frozen].clone() for p in params] if len(frozen) else None
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                scores.clamp_(min=0)
                _keep_removed(scores, alphas, support, closed_gates, _alpha_at_threshold(cfg))
                if program is not None:  # filters outside the program stay removed
                    scores[0, ~program.support] = 0
                if before is not None:
                    for p, b in zip(params, before):
                        p[frozen] = b
            means = self._log(
                "optimize", step, loss, kl, l1, gp, scores, alphas, use_gates, active, program
            )
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
        return optimizer

    def _gates_open(self, alphas: torch.Tensor, use_gates: bool) -> torch.Tensor:
        """Bool ``[K, G]``: the gates at or above the threshold."""
        if not use_gates:
            return torch.ones_like(alphas, dtype=torch.bool)
        cfg = self.config
        return torch.sigmoid(alphas.detach() / cfg.temperature) >= cfg.gate_threshold

    def threshold(
        self, scores: torch.Tensor, alphas: torch.Tensor, use_gates: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 4: scores below tau and units of closed gates become 0.

        Returns the final scores, the open gates (bool) and the soft gate values.
        """
        cfg = self.config
        soft = torch.sigmoid(alphas / cfg.temperature) if use_gates else torch.ones_like(alphas)
        gates_open = soft >= cfg.gate_threshold
        final = torch.where(scores >= cfg.score_threshold, scores, torch.zeros_like(scores))
        final[self._inside_closed(gates_open)] = 0
        return final, gates_open, soft

    def _inside_closed(self, gates_open: torch.Tensor) -> torch.Tensor:
        """Bool ``[K, U]``: the units inside a closed gate of each region."""
        inside = torch.zeros(self.k, self.structure.total_units, dtype=torch.bool)
        inside = inside.to(gates_open.device)
        for i, gate in enumerate(self.structure.gates):
            closed = ~gates_open[:, i]
            for unit in gate.units:
                a, b = self.offsets[unit]
                inside[closed, a:b] = True
        return inside

    # -- compact steps ------------------------------------------------------
    def _compaction(
        self,
        state: MaskState,
        scores: torch.Tensor,
        gates_open: torch.Tensor,
        current: CompactProgram | None,
    ) -> CompactProgram | None:
        """The compact program the next step runs on (``ChainConfig.compact_below``):
        ``current``, a new one once the non-zero scores are few enough, or ``None`` (a step
        on the whole model). Only the scores count, not the gates: they close in the first
        steps and may reopen, while the scores reach zero only once sorted."""
        below = self.config.compact_below
        if below is None or self.k != 1 or self.extra or self.compact_failed:
            return current
        nonzero = scores.detach() > 0
        limit = below * nonzero.shape[1] if current is None else _RECOMPACT * current.filters
        if int(nonzero.sum()) > limit:
            return current
        live = nonzero & ~self._inside_closed(gates_open)
        from captum_chains.export.compact import compact_program

        example = tuple(t[:2] for t in self.batch)
        try:
            program = compact_program(
                self.model,
                self.structure,
                live[0],
                gates_open[0],
                example,
                # values cached under autocast would be reused outside it
                cache=self.config.autocast is None,
            )
            with torch.no_grad():
                self._state(scores.detach(), self._hard_gates(gates_open), state, hard=True)
                expected = self._run_model(example)
            program.check(scores[0].detach(), example, expected)
        except Exception as err:  # the export's surgery raises many kinds on unusual models
            self.compact_failed = True
            warnings.warn(
                f"compact steps are not available for this model ({type(err).__name__}: "
                f"{err}); every step runs on the whole model (ChainConfig(compact_below=None) "
                "turns compact steps off)",
                stacklevel=4,
            )
            return current
        return program

    def _hard_gates(self, gates_open: torch.Tensor) -> torch.Tensor | None:
        if gates_open.shape[1] == 0:
            return None
        return gates_open.float()

    def hard_logits(
        self, state: MaskState, final: torch.Tensor, gates_open: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the thresholded network(s) on the batch."""
        with torch.no_grad():
            self._state(final, self._hard_gates(gates_open), state, hard=True)
            with self._autocast():
                return self._run_model().float()

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
        program = self._compaction(state, final, gates_open, None) if cfg.finetune_steps else None
        bar = tqdm(range(cfg.finetune_steps), desc="fine-tune", disable=not progress, leave=False)
        zeros = torch.zeros_like(final[:, :0])
        for step in bar:
            kl = self._forward_kl(state, scores, hard, hard=True, sample=True, program=program)
            _set_gradients(kl.sum(), [scores])
            assert scores.grad is not None
            scores.grad.mul_(keep)
            optimizer.step()
            with torch.no_grad():
                scores.clamp_(min=0)
                scores.copy_(torch.where(keep, scores, final))
            means = self._log(
                "finetune",
                step,
                kl,
                kl,
                zeros.sum(1),
                zeros.sum(1),
                scores,
                None,
                False,
                needs,
                program,
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
        program: CompactProgram | None = None,
    ) -> dict[str, float]:
        """Append each active region's step to its history; return the means over regions
        of ``kl``, ``l1``, ``gate_penalty`` and ``kept`` (for the progress bar).

        ``computed`` in a row: the filters the step computed (all, or a compact program's).
        """
        computed = self.structure.total_units if program is None else program.filters
        cfg = self.config
        with torch.no_grad():
            kept = (scores >= cfg.score_threshold).sum(1).tolist()
            open_gates = (
                (alphas >= _alpha_at_threshold(cfg)).sum(1).tolist()
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
                        "computed": computed,
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
        subnetwork = SubNetwork(self.model, self.structure, final, gates_open, digest=self.digest)
        l1, lg = self.l1_weight, self.gate_weight
        return Chain(
            importance=subnetwork.importance,
            gates={g.name: float(v) for g, v in zip(self.structure.gates, soft.tolist())},
            subnetwork=subnetwork,
            history=list(self.histories[region]),
            structure=self.structure,
            config=self.config.replace(l1=l1, gate_penalty=lg),
            kl=kl,
            finetuned=finetuned,
        )
