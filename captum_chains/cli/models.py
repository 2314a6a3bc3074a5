"""Models named on the command line: resolve, rebuild, hash; devices and preprocessing.

Nothing is downloaded: ``efficientnet_lite0`` loads the offline ImageNet weights, the
``digits_*`` models are trained locally (cached) unless ``--weights`` is given, and any
other timm or torchvision architecture needs a state dict.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_chains.cli.images import Preprocessing
from captum_chains.cli.output import CLIError, Console, one_line

if TYPE_CHECKING:
    import torch
    from torch import nn

SPEC_FORMAT = "captum-chains/cli-model-v1"
MODEL_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
LITE0_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0")
DIGITS_NAMES = {"digits_vgg": "vgg", "digits_resnet": "resnet", "digits_vit": "vit"}
SOURCES = ("lite0", "digits", "timm", "torchvision", "timm|torchvision", "module")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """How to rebuild a model: written to ``model.json`` of every chain folder.

    Attributes
    ----------
    name : str
        The architecture name (``efficientnet_lite0``, ``digits_vgg``, a timm or
        torchvision name) or the file name of a pickled module.
    source : str
        ``"lite0"``, ``"digits"``, ``"timm"``, ``"torchvision"`` or ``"module"`` (a name both
        libraries know needs a ``timm:`` or ``torchvision:`` prefix; ``"timm|torchvision"``
        in older chain folders is settled when the weights load).
    weights : str or None
        Absolute path of a state dict (or of the pickled module).
    num_classes : int or None
        Classifier width passed to the constructor (``None``: the library's default).
    preprocessing : Preprocessing or None
        Input preprocessing (``None`` until resolved from the model).
    weights_hash : str or None
        SHA-256 of the model's state dict at extraction, checked on reload.
    """

    name: str
    source: str
    weights: str | None = None
    num_classes: int | None = None
    preprocessing: Preprocessing | None = None
    weights_hash: str | None = None

    def to_json(self) -> str:
        payload = asdict(self)
        payload["format"] = SPEC_FORMAT
        return json.dumps(payload, indent=2)

    @classmethod
    def from_json(cls, text: str, where: Path) -> ModelSpec:
        """Parse ``model.json``; anything malformed is a :class:`CLIError` naming the file."""
        try:
            payload = json.loads(text)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
            if payload.pop("format", None) != SPEC_FORMAT:
                raise ValueError("unknown format")
            prep = payload.pop("preprocessing", None)
            spec = cls(**payload)
            spec._check()
            if prep is not None:
                spec.preprocessing = Preprocessing(
                    int(prep["size"]),
                    int(prep["channels"]),
                    tuple(float(v) for v in prep["mean"]),
                    tuple(float(v) for v in prep["std"]),
                )
            return spec
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            OverflowError,
            RecursionError,
        ) as err:
            raise CLIError(
                f"{where} is not a captum-chains model description ({one_line(err, 160)})"
            ) from err

    def _check(self) -> None:
        """Types and values of the fields read from a file."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name {self.name!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} (one of {', '.join(SOURCES)})")
        if self.source == "digits" and self.name not in DIGITS_NAMES:
            raise ValueError(f"digits model {self.name!r}")
        if self.weights is not None and not isinstance(self.weights, str):
            raise ValueError(f"weights {self.weights!r}")
        if self.source not in ("lite0", "digits") and self.weights is None:
            raise ValueError(f"a {self.source} model needs a weights file")
        if self.num_classes is not None and (
            not isinstance(self.num_classes, int)
            or isinstance(self.num_classes, bool)
            or self.num_classes < 1
        ):
            raise ValueError(f"num_classes {self.num_classes!r}")
        if self.weights_hash is not None and not isinstance(self.weights_hash, str):
            raise ValueError(f"weights_hash {self.weights_hash!r}")


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def _torchvision_names() -> list[str]:
    from torchvision import models

    return list(models.list_models())


def _looks_like_path(name: str) -> bool:
    return (
        name.lower().endswith(MODEL_SUFFIXES)
        or "/" in name
        or os.sep in name
        or Path(name).expanduser().exists()
    )


def existing_file(path: str, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"{what} {path} does not exist")
    return str(p.resolve())


def resolve_model(
    model: str,
    weights: str | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
) -> ModelSpec:
    """Turn ``--model/--weights/--arch`` into a :class:`ModelSpec` (nothing is downloaded)."""
    if _looks_like_path(model):
        path = existing_file(model, "model file")
        if weights is not None:
            raise CLIError(
                "give the weights either as the --model path or with --weights, not both"
            )
        if _model_file_kind(Path(path)) == "state_dict":
            if arch is None:
                raise CLIError(
                    f"{model} holds a state dict; name its architecture with --arch "
                    "(e.g. --arch resnet18 or --arch digits_vgg)"
                )
            return resolve_model(arch, weights=path, num_classes=num_classes)
        return ModelSpec(name=Path(path).name, source="module", weights=path)
    if arch is not None:
        raise CLIError("--arch names the architecture of a state-dict file given as --model")
    if weights is not None:
        weights = existing_file(weights, "weights file")
    name = model.strip()
    key = name.lower()
    if key in LITE0_NAMES:
        if weights is None:
            return ModelSpec(name="efficientnet_lite0", source="lite0", num_classes=num_classes)
        return ModelSpec("tf_efficientnet_lite0", "timm", weights, num_classes)
    if key in DIGITS_NAMES:
        return ModelSpec(name=key, source="digits", weights=weights, num_classes=num_classes)
    library, _, bare = name.partition(":") if ":" in name else ("", "", name)
    sources = []
    if library in ("", "timm") and bare in _timm_names():
        sources.append("timm")
    if library in ("", "torchvision") and bare in _torchvision_names():
        sources.append("torchvision")
    if not sources:
        known = [*LITE0_NAMES, *DIGITS_NAMES, *_timm_names(), *_torchvision_names()]
        hint = difflib.get_close_matches(bare, list(dict.fromkeys(known)), n=3)
        raise CLIError(
            f"unknown model {model!r}: not efficientnet_lite0, digits_vgg/resnet/vit, a timm or "
            "a torchvision name, nor an existing file"
            + (f"; did you mean {', '.join(hint)}?" if hint else "")
        )
    if len(sources) > 1:
        raise CLIError(
            f"{bare} names a model of both timm and torchvision (different module layouts: a "
            f"chain of one does not load on the other); write timm:{bare} or torchvision:{bare}"
        )
    if weights is None:
        raise CLIError(
            f"{bare} has no offline weights and nothing is downloaded: pass its trained weights "
            "with --weights PATH (a state dict), or use efficientnet_lite0 / digits_vgg"
        )
    return ModelSpec(bare, "|".join(sources), weights, num_classes)


def _model_file_kind(path: Path) -> str:
    """``"state_dict"`` or ``"module"`` (a pickled object that is not a plain state dict)."""
    import pickle

    import torch

    if path.suffix == ".safetensors":
        return "state_dict"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return "module"
    except Exception as err:  # torch raises many types for damaged files
        raise CLIError(f"cannot read model file {path}: {one_line(err, 160)}") from err
    if isinstance(obj, Mapping):
        return "state_dict"
    raise CLIError(f"{path} holds a {type(obj).__name__}, neither a state dict nor an nn.Module")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``torch.save`` or safetensors file (unwrapping common wrappers)."""
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CLIError(f"cannot read weights file {path}: {one_line(err, 160)}") from err
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CLIError(f"{path} is not a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights(model: nn.Module, path: str, name: str) -> nn.Module:
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as err:
        raise CLIError(
            f"the weights in {path} do not fit {name} (weights of another architecture? pass "
            f"--num-classes if only the classifier differs): {one_line(err, 200)}"
        ) from err
    return model


def _create(source: str, name: str, num_classes: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    from torchvision import models

    return models.get_model(name, weights=None, **kwargs)


def build_model(spec: ModelSpec, console: Console, trust_pickle: bool = False) -> nn.Module:
    """Build the model a spec describes, in eval mode (never downloads weights).

    A pickled ``nn.Module`` (``spec.source == "module"``) is refused unless
    ``trust_pickle``: unpickling runs code stored in the file. State dicts are read
    with ``torch.load(weights_only=True)`` or safetensors, which run no code.
    """
    import torch

    if spec.source == "lite0":
        from captum_chains.pretrained import load_efficientnet_lite0

        try:
            return load_efficientnet_lite0()
        except ImportError as err:
            raise CLIError(one_line(err)) from err
    if spec.source == "digits":
        from captum_chains.zoo import build_digits_model, train_digits_model

        arch = DIGITS_NAMES[spec.name]
        kwargs = {} if spec.num_classes is None else {"num_classes": spec.num_classes}
        if spec.weights is not None:
            return _load_weights(build_digits_model(arch, **kwargs), spec.weights, spec.name).eval()
        console.info(f"training {spec.name} on scikit-learn's digits (cached after the first run)")
        return train_digits_model(arch)
    if spec.source == "module":
        if spec.weights is None:
            raise CLIError(f"the model description of {spec.name} names no model file")
        if not trust_pickle:
            raise CLIError(
                f"{spec.weights} is a pickled nn.Module: loading it would run code stored in "
                "the file, so it is refused. Save a state dict instead "
                "(torch.save(model.state_dict(), path)) and pass --model PATH --arch NAME, "
                "or pass --trust-pickle if you trust the file"
            )
        console.warn(
            f"{spec.weights} is a pickled model: loading it runs code stored in the file "
            "(allowed by --trust-pickle); only load files you trust"
        )
        try:
            model = torch.load(spec.weights, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CLIError(f"cannot load model file {spec.weights}: {one_line(err, 200)}") from err
        if not isinstance(model, torch.nn.Module):
            raise CLIError(f"{spec.weights} holds a {type(model).__name__}, not an nn.Module")
        return model.eval()
    if spec.weights is None:
        raise CLIError(f"{spec.name} has no offline weights; pass them with --weights PATH")
    errors = []
    for source in spec.source.split("|"):
        try:
            model = _create(source, spec.name, spec.num_classes)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CLIError(f"cannot build {source}'s {spec.name!r}: {one_line(err, 200)}") from err
        try:
            _load_weights(model, spec.weights, f"{source}'s {spec.name}")
        except CLIError as err:
            errors.append(err)
            continue
        spec.source = source
        return model.eval()
    raise errors[0]


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the names, shapes and values of the model's state dict."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:20]


def default_preprocessing(spec: ModelSpec, model: nn.Module) -> Preprocessing:
    """The input preprocessing a model expects, read from the model where it says."""
    from torch import nn

    if spec.source == "digits":  # captum_chains.zoo.load_digits_data: (x - 0.3) / 0.4
        return Preprocessing(32, 1, (0.3,), (0.4,))
    if spec.source == "lite0":  # captum_chains.data.preprocess
        return Preprocessing(224, 3, IMAGENET_MEAN, IMAGENET_STD)
    if spec.source == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        c, h, _ = cfg["input_size"]
        return Preprocessing(int(h), int(c), tuple(cfg["mean"]), tuple(cfg["std"]))
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels = first.in_channels if first is not None and first.in_channels in (1, 3) else 3
    if channels == 3:
        return Preprocessing(224, 3, IMAGENET_MEAN, IMAGENET_STD)
    return Preprocessing(224, 1, (0.5,), (0.5,))


def parse_device(name: str | None) -> torch.device:
    """``--device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ``mps``."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {name}: not a device name (cpu, cuda, cuda:0, mps)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def categories_for(num_classes: int) -> list[str] | None:
    """ImageNet class names for 1000-class models."""
    if num_classes != 1000:
        return None
    from captum_chains.pretrained import imagenet_categories

    return imagenet_categories()
