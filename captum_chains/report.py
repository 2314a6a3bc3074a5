"""One self-contained HTML page that shows a chain: ``chain.report(path)``.

The page puts together what :mod:`captum_chains.metrics` and
:mod:`captum_chains.visualization` compute for a NeuroChains chain (Wang, Zhou and Bilmes,
TMLR 2022), in the order a reader needs them:

1. summary and fidelity table (Fig. 2, left), the hyperparameters;
2. the optimization history (loss, KL, kept units per step);
3. the architecture with the kept filters coloured by score (Fig. 1);
4. the filter -> filter chain graph with its strongest paths (Fig. 7);
5. per-layer SMOE maps of the region's inputs, original beside sub-network (Fig. 4);
6. activation-maximization pictures of the top kept filters (Fig. 6);
7. the kept filters firing in the original network and in the sub-network;
8. Captum's Integrated Gradients and Grad-CAM beside NeuroChains' own map.

Every figure is a PNG embedded as base64 and the style sheet is inline: the file opens
offline, can be mailed or attached to a paper's supplement, and loads nothing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_chains._utils.optional import require

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from captum_chains.result import Chain

SECTIONS = (
    "summary",
    "history",
    "architecture",
    "graph",
    "smoe",
    "filters",
    "firing",
    "compare",
)


@dataclass
class ReportOptions:
    """What the page shows and how much work its figures may take.

    Attributes
    ----------
    inputs : Tensor or None
        The inputs drawn and evaluated (default: the chain's region).
    target : int, sequence of int or None
        Target class(es) of the attribution methods (default: the model's prediction).
    title : str or None
        Page title (default: the model's class name).
    max_inputs : int
        Inputs shown in the per-input figures.
    max_filters : int
        Kept filters shown in the filter pictures and firing figures.
    filter_steps : int
        Activation-maximization steps per picture.
    paths : int
        Strongest chain paths highlighted and listed.
    denormalize : callable or None
        Maps a normalized input back to ``[0, 1]`` for display.
    class_names : sequence of str or None
        Names of the classes, for the attribution figure.
    info : mapping of str to object
        Extra rows for the summary table (e.g. the CLI's model name and images).
    """

    inputs: torch.Tensor | None = None
    target: Any = None
    title: str | None = None
    max_inputs: int = 3
    max_filters: int = 4
    filter_steps: int = 128
    paths: int = 5
    denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    class_names: Sequence[str] | None = None
    info: Mapping[str, Any] | None = None


def chain_report(
    chain: Chain,
    path: str | Path,
    *,
    sections: Sequence[str] = SECTIONS,
    strict: bool = False,
    **options: Any,
) -> Path:
    """Write one self-contained HTML page about ``chain``.

    Parameters
    ----------
    chain : Chain
        The chain (its sub-network's ``model`` is the original network).
    path : str or Path
        The ``.html`` file to write (its folder is created).
    sections : sequence of str
        Which of :data:`SECTIONS` to include, in page order.
    strict : bool
        Raise the first error of a section. By default a failing section (e.g. Grad-CAM on
        a model without a convolution) becomes a visible note on the page and a
        ``RuntimeWarning``, and the other sections are still drawn.
    **options
        Fields of :class:`ReportOptions`.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        For an unknown section, or an unknown option.
    """
    require("matplotlib", "Chain.report()")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown report sections {unknown}; choose from {', '.join(SECTIONS)}")
    try:
        opts = ReportOptions(**options)
    except TypeError as err:
        raise ValueError(f"{err}; options are the fields of ReportOptions") from None
    if opts.max_inputs < 1 or opts.max_filters < 1 or opts.paths < 1:
        raise ValueError("max_inputs, max_filters and paths must be at least 1")
    path = Path(path).expanduser()
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"the report is an HTML page: give a .html path, not {path.name!r}")
    inputs = opts.inputs if opts.inputs is not None else chain.inputs
    body = []
    for name in sections:
        title, builder = _BUILDERS[name]
        needs_inputs = name in {"summary", "graph", "smoe", "firing", "compare"}
        if needs_inputs and inputs is None and name != "summary":
            body.append(_section(name, title, _note("no inputs: the chain stores no region")))
            continue
        try:
            content = builder(chain, inputs, opts)
        except Exception as err:  # a figure that cannot be drawn for this model
            if strict:
                raise
            message = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"chain report: section {name!r} failed ({message})", RuntimeWarning, stacklevel=2
            )
            content = _note(f"This section could not be drawn: {message}")
        body.append(_section(name, title, content))
    page = _page(opts.title or f"Chain of {type(chain.subnetwork.model).__name__}", sections, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sections
def _summary(chain: Chain, inputs: torch.Tensor | None, opts: ReportOptions) -> str:
    structure = chain.structure
    kept, total = chain.num_filters, chain.total_filters
    removed = chain.subnetwork.removed_gates
    rows: list[tuple[str, Any]] = [
        ("model", type(chain.subnetwork.model).__name__),
        ("family", structure.family),
        ("kept units", f"{kept} / {total} ({100 * kept / max(total, 1):.2f}%)"),
        ("removed layers / blocks", f"{len(removed)} / {len(structure.gates)}"),
        ("KL(original || sub-network), at extraction", f"{chain.kl:.4g}"),
        ("fine-tuned", "yes" if chain.finetuned else "no"),
        ("optimization steps", len(chain.history)),
        ("region", "not stored" if inputs is None else f"{inputs.shape[0]} inputs"),
    ]
    rows += list((opts.info or {}).items())
    parts = [_table(["", ""], rows, header=False)]
    if inputs is not None:
        from captum_chains.metrics import fidelity

        numbers = fidelity(chain.subnetwork, inputs).summary()
        parts.append("<h3>Fidelity on the region</h3>")
        parts.append(
            _table(
                ["top-1 agreement", "mean drop of p(original class)", "median drop", "mean KL"],
                [
                    (
                        f"{numbers['agreement']:.3f}",
                        f"{numbers['mean_drop']:.4f}",
                        f"{numbers['median_drop']:.4f}",
                        f"{numbers['kl']:.4g}",
                    )
                ],
            )
        )
    layers = [
        (name, int((scores > 0).sum()), int(scores.numel()))
        for name, scores in chain.importance.items()
    ]
    parts.append("<h3>Kept units per layer</h3>")
    parts.append(_details("per-layer table", _table(["layer", "kept", "total"], layers)))
    if removed:
        parts.append(f"<p>Removed: {html.escape(', '.join(removed))}</p>")
    config = sorted(chain.config.to_dict().items())
    parts.append(_details("hyperparameters (ChainConfig)", _table(["field", "value"], config)))
    return "\n".join(parts)


def _history(chain: Chain, inputs: torch.Tensor | None, opts: ReportOptions) -> str:
    from matplotlib.figure import Figure

    if not chain.history:
        return _note("the chain has no history")
    figure = Figure(figsize=(8, 2.6))
    axes = figure.subplots(1, 3)
    steps = list(range(len(chain.history)))
    for ax, key in zip(axes, ("loss", "kl", "kept")):
        ax.plot(steps, [row.get(key, float("nan")) for row in chain.history], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    phases = [row.get("phase") for row in chain.history]
    if "finetune" in phases:
        start = phases.index("finetune")
        for ax in axes:
            ax.axvline(start, color="grey", ls="--", lw=0.8)
    figure.tight_layout()
    return _figure(figure, "Optimization history; the dashed line starts the fine-tuning.")


def _architecture(chain: Chain, inputs: torch.Tensor | None, opts: ReportOptions) -> str:
    from captum_chains.visualization import plot_architecture

    return _figure(
        plot_architecture(chain),
        "Every layer of the model in order; kept filters coloured by their score, removed "
        "layers and blocks greyed out.",
    )


def _graph(chain: Chain, inputs: torch.Tensor | None, opts: ReportOptions) -> str:
    from captum_chains.visualization import plot_chain

    figure = plot_chain(chain, inputs, paths=opts.paths)
    paths = chain.paths(opts.paths, inputs)
    listing = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in paths)
    return (
        _figure(figure, "Filter -> filter graph of the chain; the strongest paths highlighted.")
        + f"<h3>Strongest paths</h3><ol>{listing}</ol>"
    )


def _smoe(chain: Chain, inputs: torch.Tensor | None, opts: ReportOptions) -> str:
    from captum_chains.visualization import plot_feature_maps

    figure = plot_feature_maps(
        chain, inputs, max_inputs=opts.max_inputs, denormalize=opts.denormalize
    )
    return _figure(
        figure,
        "Per-layer SMOE scale maps (Mundhenk et al. 2019) of the region's inputs: original "
        "network beside the sub-network.",
    )


def _filters(chain: Chain, inputs: torch.Tensor | None, opts: ReportOptions) -> str:
    from captum_chains.visualization import plot_filters

    figure = plot_filters(
        chain,
        inputs=inputs,
        max_filters=opts.max_filters,
        steps=opts.filter_steps,
        denormalize=opts.denormalize,
    )
    return _figure(
        figure,
        "Top kept filters: activation-maximization pictures and the input patches that "
        "excite them most.",
    )


def _firing(chain: Chain, inputs: torch.Tensor | None, opts: ReportOptions) -> str:
    from captum_chains.visualization import plot_firing

    figure = plot_firing(
        chain,
        inputs,
        max_filters=opts.max_filters,
        max_inputs=opts.max_inputs,
        denormalize=opts.denormalize,
    )
    return _figure(figure, "Kept filters' maps in the original network and in the sub-network.")


def _compare(chain: Chain, inputs: torch.Tensor | None, opts: ReportOptions) -> str:
    from captum.attr import IntegratedGradients, LayerGradCam

    from captum_chains.visualization import compare

    figure, result = compare(
        chain,
        inputs,
        (IntegratedGradients, LayerGradCam),
        target=opts.target,
        max_inputs=opts.max_inputs,
        denormalize=opts.denormalize,
        class_names=opts.class_names,
        return_result=True,
    )
    rows = [
        (method, ", ".join(f"{v:.2f}" for v in values[: opts.max_inputs]))
        for method, values in result.rank_correlation.items()
    ]
    table = _table(["map pair", "Spearman rank correlation per input"], rows) if rows else ""
    return (
        _figure(
            figure,
            "Captum's Integrated Gradients and Grad-CAM on the model and on the sub-network, "
            "beside NeuroChains' own map.",
        )
        + table
    )


_BUILDERS: dict[str, tuple[str, Callable[[Chain, Any, ReportOptions], str]]] = {
    "summary": ("Summary and fidelity", _summary),
    "history": ("Optimization", _history),
    "architecture": ("Architecture with scores", _architecture),
    "graph": ("Chain graph", _graph),
    "smoe": ("SMOE maps of the region", _smoe),
    "filters": ("Top kept filters", _filters),
    "firing": ("Original vs sub-network firing", _firing),
    "compare": ("Integrated Gradients and Grad-CAM", _compare),
}


# ----------------------------------------------------------------------------- HTML
def figure_to_data_uri(figure: Figure, dpi: int = 110) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(figure: Figure, caption: str) -> str:
    uri = figure_to_data_uri(figure)
    text = html.escape(caption)
    return f'<figure><img src="{uri}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _details(summary: str, content: str) -> str:
    return f"<details><summary>{html.escape(summary)}</summary>{content}</details>"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>"
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table>{head if header else ''}{body}</table>"


def _section(name: str, title: str, content: str) -> str:
    return f'<section id="{name}"><h2>{html.escape(title)}</h2>\n{content}\n</section>'


_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;
background:#fafafa}
header{background:#263238;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.8;font-size:13px}
nav{padding:8px 32px;background:#eceff1;font-size:13px}
nav a{margin-right:14px;color:#37474f}
main{max-width:1100px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:18px 0;
padding:6px 20px 14px}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:6px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #e0e0e0;padding:3px 9px;text-align:left}
th{background:#f5f5f5}
figure{margin:8px 0}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#555;margin-top:4px}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:6px 10px}
code{font-size:12px}
"""


def _page(title: str, sections: Sequence[str], body: Sequence[str]) -> str:
    from captum_chains import __version__

    nav = "".join(f'<a href="#{name}">{html.escape(_BUILDERS[name][0])}</a>' for name in sections)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        f"<header><h1>{html.escape(title)}</h1><p>NeuroChains chain report (Wang, Zhou and "
        f"Bilmes, TMLR 2022) written by captum-chains {__version__} on {stamp}</p></header>\n"
        f"<nav>{nav}</nav>\n<main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )
