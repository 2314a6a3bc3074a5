"""Export a chain of the real EfficientNet-Lite0 and measure size, cost and exactness.

By default the chain is built from masks (fast): layer by layer, the filters whose
activation varies most over the region given the filters kept upstream are kept
(``--keep``), and the ``--close`` residual blocks whose branch changes their input
least are removed. With ``--extract-steps N``
the chain is extracted by NeuroChains instead (slow on a CPU).

Prints the export report (parameters and multiply-accumulates before/after, max
|export - SubNetwork| relative to the logit range on the region and on other photos),
the export time, and whether TorchScript, torch.export and ONNX accept the export.

    python benchmarks/export_lite0.py --keep 0.1 --close 3
    python benchmarks/export_lite0.py --extract-steps 40
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings

import torch

from captum_chains.data import local_region, sample_photo
from captum_chains.export import export_subnetwork, verify
from captum_chains.pretrained import load_efficientnet_lite0
from captum_chains.subnetwork import subnetwork_from_mappings
from captum_chains.units import discover


def _site_values(model, unit, run):
    """Run ``run()`` and return the tensor at ``unit``'s score site."""
    seen = []
    site = model.get_submodule(unit.site)
    if unit.hook == "output":
        handle = site.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    else:
        handle = site.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


def activation_masks(model, structure, inputs, keep):
    """Greedy masks that form chains: layer by layer, in execution order, keep the
    ``keep`` fraction of filters whose site activation varies most over the region
    *given the filters already kept upstream* (a filter whose inputs were all removed
    is constant and is dropped). Scores are the spread relative to the layer's largest.
    """
    importance = {u.name: torch.ones(u.size) for u in structure.units}
    for unit in structure.units:
        sub = subnetwork_from_mappings(model, structure, importance)
        t = _site_values(model, unit, lambda sub=sub: sub(inputs))
        dim = unit.channel_dim % t.ndim
        spread = t.movedim(dim, 0).reshape(t.shape[dim], -1).std(1)
        k = max(1, round(keep * unit.size))
        top = spread.topk(k).indices
        scores = torch.zeros(unit.size)
        scores[top] = (spread[top] / spread.max()).clamp(min=0.05)
        importance[unit.name] = scores
    return importance


def weakest_blocks(model, structure, inputs, count):
    """Names of the ``count`` block gates whose block output is closest to its input."""
    change: dict[str, float] = {}
    handles = []
    try:
        for gate in structure.gates:
            if gate.kind != "block":
                continue

            def hook(m, args, out, name=gate.name):
                change[name] = float((out - args[0]).norm() / args[0].norm())

            handles.append(model.get_submodule(gate.start).register_forward_hook(hook))
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return sorted(change, key=change.get)[:count]


def runtimes(exported, x):
    """Which of TorchScript / torch.export / ONNX accept the export (and agree)."""
    out = {}
    with torch.no_grad():
        y = exported(x)
        for name, fn in (
            ("torchscript", lambda: torch.jit.script(exported)(x)),
            ("torch.export", lambda: torch.export.export(exported, (x,)).module()(x)),
        ):
            try:
                out[name] = float((fn() - y).abs().max())
            except Exception as err:  # report, do not stop the benchmark
                out[name] = f"failed: {type(err).__name__}"
    try:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(exported, (x,), buf, dynamo=False)
        import onnxruntime as ort

        session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        out["onnx"] = float((torch.from_numpy(got) - y).abs().max())
    except Exception as err:
        out["onnx"] = f"failed: {type(err).__name__}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of filters kept")
    parser.add_argument("--close", type=int, default=3, help="residual blocks removed")
    parser.add_argument("--n", type=int, default=8, help="region size")
    parser.add_argument("--extract-steps", type=int, default=0)
    parser.add_argument("--no-runtimes", action="store_true")
    parser.add_argument("--out", default=None, help="append a JSON line with the results")
    args = parser.parse_args()

    model = load_efficientnet_lite0()
    region = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=args.n, seed=0)
    others = local_region([sample_photo("astronaut")], n=4, seed=1)
    if args.extract_steps:
        from captum_chains import ChainExtractor

        chain = ChainExtractor(model, steps=args.extract_steps).attribute(region, progress=True)
        sub, how = chain.subnetwork, f"NeuroChains, {args.extract_steps} steps"
    else:
        structure = discover(model, (region[:2],))
        importance = activation_masks(model, structure, region, args.keep)
        closed = weakest_blocks(model, structure, region, args.close)
        sub = subnetwork_from_mappings(model, structure, importance, {g: False for g in closed})
        how = f"greedy masks, top {args.keep:.0%} filters, {len(closed)} blocks removed"

    start = time.perf_counter()
    exported = export_subnetwork(sub, example_inputs=region[:2], check_inputs=region)
    seconds = time.perf_counter() - start
    report = exported.report
    with torch.no_grad():
        ref = sub(others)
        agree = float((sub(region).argmax(1) == model(region).argmax(1)).float().mean())
    other_diff = verify(exported, sub, others)
    result = {
        "chain": how,
        "top1_agreement_with_model": agree,
        "export_seconds": round(seconds, 2),
        **report.to_dict(),
        "other_photos_max_abs_diff": other_diff,
        "other_photos_relative_error": other_diff / float(ref.max() - ref.min()),
    }
    if not args.no_runtimes:
        result["runtimes_max_abs_diff"] = runtimes(exported, region[:2])
    print(f"chain: {how}; top-1 agreement with the model on the region {agree:.0%}")
    print(report)
    print(f"export took {seconds:.1f} s; on other photos max diff {other_diff:.3g}")
    if "runtimes_max_abs_diff" in result:
        print("runtimes:", result["runtimes_max_abs_diff"])
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    main()
