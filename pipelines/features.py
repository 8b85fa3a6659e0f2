"""What a built model computes beside its logits: its BatchNorms folded into the convolutions before them (the same
function, one pass less: prediction), and the features the unknown scores read, `[head penultimate | pooled input of
the reference body's last stage]` (`forward_features`), of a model alone or `WithReference` to the pretrained body
it was fine-tuned from."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .backbones import TorchvisionBody, create_body, get_spec, stem_names
from .errors import ItfitsError


def _folded_remainder(bn: nn.Module) -> nn.Module | None:
    """What is left of a BatchNorm once folded into the convolution before it: nothing (torch's BatchNorm2d) or
    the dropout and activation of timm's BatchNormAct2d; None for kinds this does not know."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "drop") and hasattr(bn, "act"):
        return nn.Sequential(bn.drop, bn.act)
    return None


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            and bn.num_features == conv.out_channels and _folded_remainder(bn) is not None)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """An inference copy of `model` with each BatchNorm that follows a convolution folded into that convolution's
    weights and bias: the same function with one pass over the activations less (EfficientNet-Lite0 at 64 px
    predicts about 1.3x as fast on a CPU). A pair is a convolution registered right before a BatchNorm of its
    width, as in timm's and torchvision's conv nets; the copy is checked against `model` on `example`, and
    `model` itself is returned where they differ or there is nothing to fold (a model folded already)."""
    modules = list(model.named_modules())
    pairs = [(c, b) for (c, conv), (b, bn) in zip(modules, modules[1:]) if _foldable(conv, bn)]
    if not pairs:
        return model
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        scale = (bn.weight if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift)
        parent, _, attr = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent), attr, _folded_remainder(bn))
    want, got = model.eval()(example), folded(example)
    # CUDA convolutions run in TF32 by default (10-bit mantissa): the two differ by more than fp32 rounding there;
    # a wrong fold differs by the size of the outputs themselves
    tol = 1e-2 if example.is_cuda else 1e-4
    return folded if torch.allclose(want, got, rtol=tol, atol=tol * float(want.abs().max())) else model


def last_stage(body: nn.Module) -> nn.Module:
    """The body's last stage of blocks: timm's `blocks` (EfficientNet, ViT) or `stages` (ConvNeXt), a ResNet's layer4."""
    if isinstance(body, TorchvisionBody):
        return body.features[-2]
    for name in ("stages", "blocks"):
        if isinstance(getattr(body, name, None), nn.Sequential):
            return getattr(body, name)[-1]
    info = getattr(body, "feature_info", None)  # other timm models name their stages here (a timm ResNet's layer4)
    if info:
        return body.get_submodule(info[-1]["module"])
    raise ItfitsError(f"no last stage found in {type(body).__name__}: register it in features.last_stage")


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3)) if x.ndim == 4 else x.mean(1)  # (B, C, H, W) or ViT tokens (B, N, C) -> (B, C)


class _Reached(Exception):
    """Stops a forward pass once the tensor wanted is seen: the rest is not needed."""


def run_until(body: nn.Module, module: nn.Module, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    """`module`'s input (output=False) or output (True) when `body` runs on `x`; the rest of `body` is not run."""
    seen = []

    def reached(*hook_args):  # a pre-hook gets (module, args), a forward hook (module, args, out)
        seen.append(hook_args[2] if output else hook_args[1][0])
        raise _Reached

    hook = module.register_forward_hook(reached) if output else module.register_forward_pre_hook(reached)
    try:
        body(x)
    except _Reached:
        pass
    finally:
        hook.remove()
    return seen[0]


def stage_features(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C) the input of `body`'s last stage, averaged over positions; the last stage itself is not run."""
    return _pooled(run_until(body, last_stage(body), x, output=False))


class WithReference(nn.Module):
    """A fine-tuned `model` (body, head) beside `reference`, the pretrained body it started from, frozen: the
    unknown scores on the reference's features see what fine-tuning on a few classes forgets (bench/BENCHMARKS.md,
    "Unknown-detection suite"). With `shared_stages`, the model kept its stem and first stages pretrained
    (backbones.freeze_stem): the reference drops them and goes on from the model's output of them, one pass over
    the shared layers. Its forward gives forward_features' two outputs side by side (for fold_batchnorm's check)."""

    def __init__(self, model: nn.Sequential, reference: nn.Module, shared_stages: int = 0):
        super().__init__()
        for name in stem_names(reference, shared_stages):
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent), attr, nn.Identity())
        self.shared_stages = shared_stages
        self.model, self.reference = model, reference.eval().requires_grad_(False)

    def forward(self, x):
        return torch.cat(forward_features(self, x), 1)


def with_reference(model: nn.Sequential, arch: str, weights: str) -> WithReference:
    """`model` beside the pretrained body of `arch` it was fine-tuned from (`weights` as at fit), sharing the stem
    the model kept frozen where it is still the pretrained one (the EMA may move it by rounding only)."""
    reference = create_body(get_spec(arch), weights=weights)[0].to(next(model.parameters()).device)
    stages = getattr(model[0], "frozen_stages", 0)
    ref_state = reference.state_dict()
    same = all(torch.allclose(v.float(), ref_state[f"{name}.{k}"].float(), rtol=1e-5, atol=1e-6)
               for name in stem_names(model[0], stages) for k, v in model[0].get_submodule(name).state_dict().items())
    return WithReference(model, reference, stages if same else 0)


def forward_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) for the unknown scores: features are [the input of the head's last Linear | the input of
    the body's last stage, averaged over positions | (WithReference) the same stage input of the pretrained
    reference body]. The second part is more generic than the head's: unknowns that the fine-tuned head maps close
    to a class often stand out there, and more so in the reference, which fine-tuning did not change."""
    if getattr(model, "returns_features", False):  # an exported file's network (export.ExportedModel): both already
        return model(x)
    if isinstance(model, WithReference):
        shared = []  # the output of the stem both share, where they do
        names = stem_names(model.model[0], model.shared_stages)
        hook = (model.model[0].get_submodule(names[-1]).register_forward_hook(lambda m, args, out: shared.append(out))
                if names else None)
        try:
            logits, features = forward_features(model.model, x)
        finally:
            if hook is not None:
                hook.remove()
        reference = stage_features(model.reference, shared[0] if shared else x)
        return logits, torch.cat([features, reference.to(features.dtype)], 1)
    seen = []
    hook = last_stage(model[0]).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        head = model[1][:-1](model[0](x))
    finally:
        hook.remove()
    return model[1][-1](head), torch.cat([head, _pooled(seen[0]).to(head.dtype)], 1)
