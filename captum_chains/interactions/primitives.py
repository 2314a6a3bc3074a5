"""``InteractionPrimitives``: AND-OR interactions shared across models, as a Captum method.

Chen, Lou, Huang & Zhang, "Defining and Extracting Generalizable Interaction Primitives
from DNNs", ICLR 2024. One call evaluates every model on all ``2**n`` masked samples of
each input (batched, chunked), then finds the sparsest AND-OR decomposition of each
model's value — jointly across models with Eq. (6) (``method="shared"``) or per model
with Eq. (4) (``method="single"``) — and returns an :class:`InteractionResult`. Every
setting lives in one :class:`~captum_chains.interactions.config.InteractionConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from captum.attr import PerturbationAttribution

from captum_chains._utils.validation import (
    format_additional_args,
    format_inputs,
    format_target,
)
from captum_chains.interactions.config import InteractionConfig, normalise_overrides
from captum_chains.interactions.evaluate import chunk_size, evaluate_values
from captum_chains.interactions.optimize import (
    Problem,
    SolverConfig,
    decompose,
    objective,
    solve,
)
from captum_chains.interactions.players import (
    BaselineSpec,
    resolve_baselines,
    validate_players,
)
from captum_chains.interactions.result import InteractionResult
from captum_chains.interactions.values import TargetType, ValueFn, resolve_value

# float64 values + float32 parameters, Adam moments, gradients and intermediates
_BYTES_PER_ENTRY = 128


class InteractionPrimitives(PerturbationAttribution):
    """Generalizable AND-OR interaction primitives (Chen et al., ICLR 2024).

    Parameters
    ----------
    forward_func : callable or sequence of callables
        One model, or ``m >= 2`` models trained for the same task. Each takes the
        (masked) input tensors followed by ``additional_forward_args`` and returns
        ``[K, classes]`` scores (or ``[K]`` for one score).
    value : str or callable
        ``v(x_T)``: ``"log_odds"`` (default, the paper's), ``"logit"``, ``"probability"``,
        ``"log_probability"`` or ``f(output [K, ...], target [K] | None) -> [K]``.
    model_names : sequence of str, optional
        Names for the result (default: class names).

    Examples
    --------
    >>> ip = InteractionPrimitives([model_a, model_b])                  # doctest: +SKIP
    >>> mask = patch_grid_mask(32, 32, 3, 3)                            # doctest: +SKIP
    >>> res = ip.attribute(x, baselines="min", target=y, feature_mask=mask)  # doctest: +SKIP
    >>> res.s_and, res.top("and", 5, sample=0, model=0)                 # doctest: +SKIP
    >>> cfg = InteractionConfig.reference()   # the authors' code       # doctest: +SKIP
    >>> ip.attribute(x, "min", y, feature_mask=mask, config=cfg)        # doctest: +SKIP
    """

    def __init__(
        self,
        forward_func: Callable[..., torch.Tensor] | Sequence[Callable[..., torch.Tensor]],
        value: str | ValueFn = "log_odds",
        model_names: Sequence[str] | None = None,
    ) -> None:
        funcs = list(forward_func) if isinstance(forward_func, list | tuple) else [forward_func]
        if not funcs:
            raise ValueError("forward_func must be a callable or a non-empty list of callables")
        for k, f in enumerate(funcs):
            if not callable(f):
                raise TypeError(f"forward_func[{k}] is not callable ({type(f).__name__})")
        super().__init__(forward_func)
        self.forward_funcs = cast(tuple[Callable[..., torch.Tensor], ...], tuple(funcs))
        self.value_fn = resolve_value(value)
        if model_names is None:
            names = [type(f).__name__ for f in funcs]
            model_names = [
                f"{nm}[{k}]" if names.count(nm) > 1 else nm for k, nm in enumerate(names)
            ]
        if len(model_names) != len(funcs):
            raise ValueError(f"model_names has {len(model_names)} entries for {len(funcs)} models")
        self.model_names = tuple(model_names)

    @property
    def num_models(self) -> int:
        return len(self.forward_funcs)

    # ------------------------------------------------------------------ config
    @staticmethod
    def _config(config: InteractionConfig | None, overrides: dict[str, Any]) -> InteractionConfig:
        if config is not None and not isinstance(config, InteractionConfig):
            raise TypeError(f"config must be an InteractionConfig, got {type(config).__name__}")
        cfg = config or InteractionConfig()
        return cfg.replace(**overrides) if overrides else cfg

    # ------------------------------------------------------------------ values
    def compute_values(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        baselines: BaselineSpec | Sequence[BaselineSpec] = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        feature_mask: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        *,
        config: InteractionConfig | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> torch.Tensor:
        """``v(x_T)`` of every model on all ``2**n`` masked samples, ``[B, m, 2**n]`` float64.

        Every argument is checked before the first forward pass: the feature mask (ids
        ``0..n-1`` without gaps, shape), ``n`` against ``max_players`` and the memory
        budget, the baselines' shape and the target. See :meth:`attribute`; of the
        configuration, ``value``, ``batch_size``, ``memory_budget_mb`` and
        ``max_players`` are used here.
        """
        cfg = self._config(config, normalise_overrides(overrides))
        value_fn = self.value_fn if cfg.value is None else resolve_value(cfg.value)
        inps = format_inputs(tuple(inputs) if isinstance(inputs, list) else inputs, strict=False)
        batch = inps[0].shape[0]
        players = validate_players(inps, feature_mask)
        self._check_size(players.n, batch, cfg.max_players, cfg.memory_budget_mb)
        bases = resolve_baselines(inps, baselines)
        tgt = format_target(target, batch)
        tgt = None if tgt is None else tgt.to(inps[0].device)
        extra = format_additional_args(additional_forward_args)
        chunk = chunk_size(inps, cfg.memory_budget_mb, cfg.batch_size)
        out = []
        for name, f in zip(self.model_names, self.forward_funcs, strict=True):
            out.append(
                evaluate_values(
                    f,
                    inps,
                    bases,
                    players,
                    tgt,
                    value_fn,
                    extra,
                    chunk,
                    progress,
                    desc=f"v(x_T) {name}",
                )
            )
        return torch.stack(out, dim=1)

    def _check_size(self, n: int, batch: int, max_players: int, memory_budget_mb: float) -> None:
        if n > max_players:
            raise ValueError(
                f"{n} players means 2**{n} = {2**n} masked samples per input and model; the "
                f"limit is max_players={max_players}. Use fewer, larger players (a coarser "
                "patch grid or fewer superpixels) or raise max_players"
            )
        need = batch * self.num_models * (1 << n) * _BYTES_PER_ENTRY
        budget = memory_budget_mb * 2**20
        if need > budget:
            raise ValueError(
                f"n={n} players for {batch} inputs and {self.num_models} models needs about "
                f"{need / 2**20:.0f} MiB for the 2**n values and the optimisation, more than "
                f"memory_budget_mb={memory_budget_mb:g}. Use fewer players, fewer inputs per "
                "call, or a larger memory_budget_mb"
            )

    # ----------------------------------------------------------------- extract
    def extract(
        self,
        values: torch.Tensor,
        config: InteractionConfig | None = None,
        *,
        player_names: Sequence[str] | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> InteractionResult:
        """Sparsest AND-OR decomposition of precomputed values ``[B, m, 2**n]``.

        See :meth:`attribute` for the parameters; ``values`` come from
        :meth:`compute_values` (so that several methods can share one evaluation).
        """
        cfg = self._config(config, normalise_overrides(overrides))
        if values.dim() != 3:
            raise ValueError(f"values must be [B, m, 2**n], got shape {tuple(values.shape)}")
        _, m, size = values.shape
        n = size.bit_length() - 1
        if 1 << n != size:
            raise ValueError(f"the last dimension of values must be 2**n, got {size}")
        method = self._method(cfg, m)
        names = self._player_names(player_names, n)
        solver = SolverConfig(method=cfg.solver) if isinstance(cfg.solver, str) else cfg.solver
        values = values.double()
        v_empty = values[..., 0].clone()
        if cfg.subtract_empty:
            values = values - v_empty[..., None]
        spread = (values[..., -1] - values[..., 0]).abs()  # [B, m]
        q = cfg.noise_bound * spread
        p = None
        if method == "shared":
            if cfg.gamma_scale is None:
                scale = spread.mean(dim=0)
            else:
                scale = torch.as_tensor(cfg.gamma_scale, dtype=torch.float64, device=values.device)
                scale = scale.expand(m).clone()
            p = cfg.gamma_bound * scale
        problem = Problem(values, q, p, method == "shared", cfg.alpha, cfg.weighting)
        sol = solve(problem, solver, progress=progress)
        i_and, i_or = decompose(values, sol.gamma, sol.noise)
        loss = objective(i_and, i_or, problem.shared, cfg.alpha, cfg.weighting)
        return InteractionResult(
            i_and=i_and,
            i_or=i_or,
            values=values,
            noise=sol.noise,
            gamma=sol.gamma,
            noise_bound=q,
            v_empty=v_empty,
            player_names=names,
            model_names=self.model_names
            if len(self.model_names) == m
            else tuple(f"model{i}" for i in range(m)),
            method=method,
            loss=loss,
            salient_fraction=cfg.salient_fraction,
            salient_count=cfg.salient_count,
            threshold=cfg.threshold,
            merge_low_order=cfg.merge_low_order,
            timings={"optimization": sol.seconds},
            history=sol.history,
            solver=sol.method,
            lower_bound=None if sol.lower_bound is None else torch.minimum(sol.lower_bound, loss),
            config=cfg,
        )

    def _method(self, cfg: InteractionConfig, m: int) -> str:
        method = cfg.method or ("shared" if m >= 2 else "single")
        if method == "shared" and m < 2:
            raise ValueError("method='shared' needs at least two models; use method='single'")
        return method

    @staticmethod
    def _player_names(player_names: Sequence[str] | None, n: int) -> tuple[str, ...]:
        if player_names is None:
            return tuple(str(i) for i in range(n))
        names = tuple(str(s) for s in player_names)
        if len(names) != n:
            raise ValueError(f"player_names has {len(names)} names for {n} players")
        if len(set(names)) != n:
            raise ValueError("player_names must be unique")
        return names

    # --------------------------------------------------------------- attribute
    def attribute(  # type: ignore[override]  # Captum: each method's own signature
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        baselines: BaselineSpec | Sequence[BaselineSpec] = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        feature_mask: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        *,
        config: InteractionConfig | None = None,
        player_names: Sequence[str] | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> InteractionResult:
        """Extract AND-OR interactions of every model on every input.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            ``[B, ...]`` inputs (images, tabular rows, embeddings, token ids).
        baselines : number, str, Tensor, or a tuple of them (one per input tensor)
            Value of a masked player: ``None``/``"zero"``, a number, ``"mean"``,
            ``"min"``, ``"blur"`` or a tensor broadcastable to the input (e.g. a
            baseline embedding ``[1, L, D]``).
        target : int, list of int, Tensor, or None
            Class whose value is decomposed (Captum formats; one per sample or shared).
            ``None`` only for models with a single output.
        additional_forward_args : any
            Extra forward arguments; tensors with first dimension ``B`` follow their
            sample.
        feature_mask : Tensor or tuple of Tensor
            Player id of every input entry (``0 .. n-1``, ``-1``: not a player, kept),
            broadcastable to the input; see ``patch_grid_mask``, ``slic_mask``,
            ``token_mask``.
        config : InteractionConfig, optional
            Every other setting (objective, bounds, solver, salient sets, memory);
            default ``InteractionConfig()``, the paper's settings with the ``"auto"``
            solver. ``InteractionConfig.reference()`` reproduces the authors' code.
        player_names : sequence of str, optional
            Names used when listing interactions (default: the indices ``"0", "1", ...``).
        progress : bool
            tqdm progress bars.
        **overrides
            Fields of :class:`InteractionConfig` to change for this call, e.g.
            ``solver="lp"`` or ``method="single"`` (unknown names raise a ``TypeError``;
            the old ``top_k=`` maps to ``salient_fraction``/``salient_count`` with a
            ``DeprecationWarning``).

        Returns
        -------
        InteractionResult
            With ``timings["evaluation"]`` (forward passes) and
            ``timings["optimization"]`` (solver) in seconds, ``solver`` (the one that
            ran) and ``lower_bound`` (a certified bound on the optimum, when available).
        """
        start = time.perf_counter()
        cfg = self._config(config, normalise_overrides(overrides))
        self._method(cfg, self.num_models)  # fail before any forward pass
        values = self.compute_values(
            inputs,
            baselines,
            target,
            additional_forward_args,
            feature_mask,
            config=cfg,
            progress=progress,
        )
        evaluated = time.perf_counter()
        result = self.extract(values, cfg, player_names=player_names, progress=progress)
        result.timings["evaluation"] = evaluated - start
        return result
