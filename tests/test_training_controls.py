"""Training controls on real small data: precision (CPU bf16 autocast, channels-last, the auto probe, fallbacks),
gradient accumulation, EMA, torch.compile, and prediction on the same fast path. Nothing here asserts timings."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from helpers import FASHION, run_here

ARCH = "efficientnet_lite0"


@pytest.fixture(scope="module")
def data():
    """(items, classes, prep, dls) for data/fashion at 32 px, batches of 16, no worker processes."""
    from pipelines.backbones import get_spec
    from pipelines.images import ImagePreprocessing, image_dataloaders
    from pipelines.sources import check_files, read_source, require_classes
    from fastai.torch_core import set_seed
    set_seed(1)
    items = check_files(read_source(FASHION, seed=1))
    classes = require_classes(items)
    spec = get_spec(ARCH)
    prep = ImagePreprocessing(size=32, mean=spec.mean, std=spec.std)
    return items, classes, prep, image_dataloaders(items, classes=classes, prep=prep, bs=16, num_workers=0)


def learner(dls, tmp_path, **kwargs):
    from fastai.torch_core import set_seed
    from pipelines.learners import image_learner
    set_seed(1)
    return image_learner(dls, ARCH, weights="auto", path=tmp_path, **kwargs)


def cpu(name: str):
    from pipelines.precision import resolve_precision
    return resolve_precision(name, arch=ARCH, size=32, device="cpu")


# ---- precision ---------------------------------------------------------------------------------------------

def test_precision_names_and_fallbacks():
    from pipelines.errors import ItfitsError, ItfitsWarning
    assert cpu("fp32").name == "fp32" and cpu("fp32").autocast().__class__.__name__ == "nullcontext"
    assert cpu("bf16").name == "bf16" and cpu("bf16").dtype == torch.bfloat16
    with pytest.warns(ItfitsWarning, match="fp16 needs a GPU"):
        fallback = cpu("fp16")
    assert fallback.name in ("fp32", "bf16") and fallback.requested == "fp16"  # never a crash, never fp16 on a CPU
    with pytest.raises(ItfitsError, match="did you mean 'fp16'"):
        cpu("fp61")


def test_auto_on_a_gpu_with_only_emulated_bf16_is_fp16(monkeypatch):
    """T4 and V100 'support' bf16 by emulation (torch's default check says yes): slow, so auto takes fp16 there."""
    from pipelines.precision import resolve_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", arch="resnet18", size=64, device="cuda").name == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and newer
    assert resolve_precision("auto", arch="resnet18", size=64, device="cuda").name == "bf16"


def test_auto_probe_is_cached_and_leaves_the_seeded_rng_alone():
    from pipelines.precision import cpu_step_times
    before = torch.get_rng_state()
    first = cpu("auto")
    assert torch.equal(before, torch.get_rng_state()), "the probe moved the RNG a seeded run depends on"
    hits = cpu_step_times.cache_info().hits
    again = cpu("auto")
    assert cpu_step_times.cache_info().hits == hits + 1, "the probe ran twice in one process"
    assert first == again and first.name in ("fp32", "bf16") and "probe" in first.reason
    t32, t16 = cpu_step_times(ARCH, 32, train=True)
    assert t32 > 0 and t16 > 0


def test_cli_rejects_bad_training_flags(tmp_path):
    proc = run_here("fit", FASHION, "--out", tmp_path / "r", "--precision", "fp61")
    assert proc.returncode == 1 and "did you mean 'fp16'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_here("fit", FASHION, "--out", tmp_path / "r", "--accum", "0")
    assert proc.returncode == 1 and "--accum" in proc.stderr


def test_bf16_training_on_cpu_learns_and_keeps_fp32_weights(data, tmp_path):
    from pipelines.learners import CpuAutocast
    from pipelines.batches import file_outputs
    from pipelines.training import train
    items, classes, prep, dls = data
    learn = learner(dls, tmp_path, precision=cpu("bf16"))
    assert any(isinstance(cb, CpuAutocast) for cb in learn.cbs)
    assert any(type(cb).__name__ == "ChannelsLast" for cb in learn.cbs), "conv nets train channels-last"
    history = train(learn, epochs=2, lr=3e-3, freeze_epochs=1)
    assert history["accuracy"][-1] > 0.5, f"bf16 run: valid accuracy {history['accuracy'][-1]} (chance 0.25)"
    assert all(p.dtype == torch.float32 for p in learn.model.parameters()), "autocast keeps fp32 master weights"
    conv = next(p for p in learn.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)

    # prediction on the same fast path: bf16 autocast, channels-last, outputs float32 and close to fp32's
    paths = [r.path for r in dls.valid_ds.items]
    l16, f16, _ = file_outputs(learn.model, prep, paths, num_workers=0, precision=cpu("bf16"), channels_last=True)
    l32, f32, _ = file_outputs(learn.model, prep, paths, num_workers=0, precision=cpu("fp32"))
    assert l16.dtype == np.float32 and f16.dtype == np.float32 and np.isfinite(l16).all()
    # bf16 is coarse (BatchNorm's subtraction of running means cancels digits on these low-contrast images):
    # most, not all, predictions agree; that is why an fp32-trained bundle predicts in fp32 under auto
    assert (l16.argmax(1) == l32.argmax(1)).mean() >= 0.75


# ---- gradient accumulation ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:You are shadowing an attribute")  # fastai's GradientAccumulation's own
def test_accumulation_steps_once_per_accum_batches(data, tmp_path):
    from fastai.callback.core import Callback
    from fastai.callback.training import GradientAccumulation
    import fastai.callback.schedule  # noqa: F401  fit_one_cycle

    class Count(Callback):
        def before_fit(self):
            self.n_batches = self.n_steps = 0

        def after_batch(self):
            self.n_batches += self.training

        def after_step(self):
            self.n_steps += 1

    _, _, _, dls = data
    learn = learner(dls, tmp_path, accum=3)
    acc = next(cb for cb in learn.cbs if isinstance(cb, GradientAccumulation))
    assert acc.n_acc == 3 * 16, "fastai's n_acc counts samples: accum x bs"
    count = Count()
    learn.freeze()
    learn.fit_one_cycle(1, 1e-3, cbs=count)
    assert count.n_batches == len(dls.train) and count.n_steps == len(dls.train) // 3


def test_tiny_batchnorm_batches_warn():
    from pipelines.backbones import create_backbone
    from pipelines.errors import ItfitsWarning
    from pipelines.learners import accumulation
    with pytest.warns(ItfitsWarning, match="BatchNorm.*fewer --accum steps"):
        cbs = accumulation(accum=8, bs=4, model=create_backbone("resnet18", num_classes=2, weights="none"))
    assert cbs[0].n_acc == 32
    with pytest.warns(ItfitsWarning, match="BatchNorm") as caught:  # no --accum: no advice about it
        accumulation(accum=1, bs=4, model=create_backbone("resnet18", num_classes=2, weights="none"))
    assert "--accum" not in str(caught[0].message) and "--bs 8 or more" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accumulation(accum=8, bs=4, model=torch.nn.Sequential(torch.nn.Linear(3, 2)))  # no BatchNorm: no warning
        accumulation(accum=2, bs=16, model=create_backbone("resnet18", num_classes=2, weights="none"))



def test_optimizer_state_from_a_checkpoint_follows_its_parameters_device():
    """--resume loads the optimizer state to the CPU before fastai moves the model to the GPU; the fused kernel
    wants both on one device. `meta` stands in for the GPU this machine lacks; fastai's Adam wrote `step` as a number."""
    from pipelines.learners import FusedAdam
    p = torch.nn.Parameter(torch.randn(4, 3, device="meta"))
    opt = FusedAdam([p], lr=1e-3)
    opt.state[p] = {"grad_avg": torch.zeros(4, 3), "sqr_avg": torch.zeros(4, 3), "step": 3}
    p.grad = torch.randn(4, 3, device="meta")
    opt.step()
    state = opt.state[p]
    assert {state[k].device.type for k in ("grad_avg", "sqr_avg", "step")} == {"meta"}
    assert state["step"].dtype == torch.float32


def test_frozen_parameters_with_zero_gradients_are_not_stepped():
    """After lr_find every parameter holds a zero gradient (fastai zeroes, keeps it); the head-only phase must
    leave the frozen body exactly as it was, not decay it."""
    from pipelines.learners import FusedAdam
    frozen, head = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    frozen.grad, head.grad = torch.zeros(3), torch.ones(3)
    frozen.requires_grad_(False)
    FusedAdam([frozen, head], lr=0.1).step()
    assert torch.equal(frozen.detach(), torch.ones(3)) and not torch.equal(head.detach(), torch.ones(3))

# ---- EMA ----------------------------------------------------------------------------------------------------

def test_fastxtend_modules_we_use_import():
    # fastxtend 0.1.7 predates fastai 2.8: only some of its modules import; these are the ones we use
    from fastxtend.callback.ema import EMACallback, EMASchedule  # noqa: F401
    from pipelines.learners import ema_class
    assert issubclass(ema_class(), EMASchedule)


def test_ema_short_run_learns_and_is_what_validation_and_the_bundle_use(data, tmp_path):
    from pipelines.learners import ema_decay_for, find_ema
    from pipelines.training import train
    items, classes, prep, dls = data
    learn = learner(dls, tmp_path, ema=True)
    ema = find_ema(learn)
    history = train(learn, epochs=2, lr=3e-3, freeze_epochs=1)
    steps = 2 * len(dls.train)
    assert ema.final_decay == pytest.approx(ema_decay_for(steps)) and ema.final_decay < 0.99, \
        "a short run needs a short EMA (0.9998 over a few dozen steps learns nothing)"
    kept = history["valid_loss"].arg_min()  # the epoch whose weights the run keeps (checkpoints.BestEpoch)
    assert history["accuracy"][kept] > 0.5, f"EMA run: valid accuracy {history['accuracy'][kept]} (chance 0.25)"
    # the model ends with the EMA weights, BatchNorm statistics included (fastxtend 0.1.7 left them behind on CPUs)
    if kept == history.height - 1:
        model, averaged = learn.model.state_dict(), learn.model_ema.state_dict()
        assert all(torch.equal(model[k], averaged[k]) for k in model)
    learn.remove_cb(ema)
    acc = learn.validate()[1]  # the plain Learner now validates the weights the bundle saves (loss, accuracy, ...)
    assert acc == pytest.approx(history["accuracy"][kept], abs=1e-6)
    assert_stem_pretrained(learn.model[0])


def assert_stem_pretrained(body):
    """The frozen stem (backbones.freeze_stem) of a trained Lite is still the pretrained one, BatchNorm statistics
    included (the EMA may move it by rounding only), and the stage after it trained."""
    from pipelines.backbones import create_body, get_spec, stem_names
    pretrained = create_body(get_spec(ARCH))[0].state_dict()
    names = stem_names(body, body.frozen_stages)
    assert body.frozen_stages == get_spec(ARCH).frozen_stages > 0 and "blocks.0" in names
    for name in names:
        for k, v in body.get_submodule(name).state_dict().items():
            torch.testing.assert_close(v, pretrained[f"{name}.{k}"], rtol=1e-5, atol=1e-6)
    after = f"blocks.{body.frozen_stages}"
    assert any(not torch.allclose(v, pretrained[f"{after}.{k}"])
               for k, v in body.get_submodule(after).state_dict().items()), "the stages after the stem train"


def test_frozen_stem_is_in_no_parameter_group_and_not_frozen_from_scratch(data, tmp_path):
    """fine_tune's unfreeze() sets every parameter group trainable: the stem is in none. Random weights (--weights
    none) are never frozen."""
    from pipelines.backbones import frozen_stem
    from pipelines.learners import body_head_split, image_learner
    dls = data[3]
    learn = learner(dls, tmp_path)
    stem = {id(p) for m in frozen_stem(learn.model[0]) for p in m.parameters()}
    groups = body_head_split(learn.model)
    assert stem and not stem & {id(p) for g in groups for p in g}
    assert len(stem) + sum(map(len, groups)) == len(list(learn.model.parameters()))
    learn.unfreeze()
    assert not any(p.requires_grad for m in frozen_stem(learn.model[0]) for p in m.parameters())
    scratch = image_learner(dls, ARCH, weights="none", path=tmp_path)
    assert frozen_stem(scratch.model[0]) == [] and all(p.requires_grad for p in scratch.model.parameters())


def test_ema_batchnorm_statistics_follow_the_model(data, tmp_path):
    import fastai.callback.schedule  # noqa: F401
    from pipelines.learners import find_ema
    _, _, _, dls = data
    learn = learner(dls, tmp_path, ema=True)
    learn.unfreeze()
    start = {k: v.clone() for k, v in learn.model.state_dict().items() if "running_var" in k}
    learn.fit_one_cycle(1, 1e-3)
    ema = find_ema(learn).ema_model.state_dict()
    from pipelines.backbones import stem_names
    stem = tuple(f"0.{n}." for n in stem_names(learn.model[0], learn.model[0].frozen_stages))
    moved = [k for k in start if not torch.allclose(ema[k], start[k])]
    trained = [k for k in start if not k.startswith(stem)]
    assert set(moved) <= set(trained), "the frozen stem's statistics moved"
    assert len(moved) > 0.9 * len(trained), "the EMA model's BatchNorm statistics stayed where they started"


# ---- torch.compile ------------------------------------------------------------------------------------------

def _tiny_learner(dls, tmp_path, cb):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from torch import nn
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                          nn.Sequential(nn.Linear(8, len(dls.vocab))))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), path=tmp_path, cbs=[cb])


@pytest.mark.slow
def test_compile_runs_with_inductor_and_keeps_key_names(data, tmp_path):
    from pipelines.learners import TorchCompile, uncompile
    _, _, _, dls = data
    cb = TorchCompile(backend="inductor")
    learn = _tiny_learner(dls, tmp_path, cb)
    keys = set(learn.model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)  # an ItfitsWarning here would mean: fell back
        learn.fit(1, 1e-3)
    assert cb.failed is None and learn.model._compiled_call_impl is not None
    assert set(learn.model.state_dict()) == keys, "no _orig_mod. prefix: bundles load into an uncompiled model"
    uncompile(learn.model)
    assert learn.model._compiled_call_impl is None


def test_compile_failure_falls_back_with_a_warning(data, tmp_path):
    from pipelines.errors import ItfitsWarning
    from pipelines.learners import TorchCompile
    _, _, _, dls = data
    cb = TorchCompile(backend="no_such_backend")
    learn = _tiny_learner(dls, tmp_path, cb)
    with pytest.warns(ItfitsWarning, match="training without it"):
        learn.fit(1, 1e-3)
    assert cb.failed and learn.model._compiled_call_impl is None
    assert np.isfinite(learn.recorder.values[-1][0])


# ---- prediction on the trained bundle ------------------------------------------------------------------------

def test_predict_precision_auto_and_bf16_agree_with_fp32(trained_run):
    from helpers import FASHION_TEST
    from pipelines.bundle import load_bundle
    from pipelines.predict import PredictConfig, predict
    bundle = load_bundle(trained_run.model)
    meta_precision = bundle.meta["training"]["precision"]
    assert meta_precision in ("fp32", "bf16"), "the bundle records the training precision"
    rows = {p: list(predict(bundle, [str(FASHION_TEST)], PredictConfig(num_workers=0, precision=p)))
            for p in ("fp32", "bf16", "auto")}
    top = {p: [r["top1"] for r in rs] for p, rs in rows.items()}
    assert np.mean([a == b for a, b in zip(top["fp32"], top["bf16"])]) >= 0.75
    assert all(r["error"] is None and 0 <= r["top1_prob"] <= 1 for r in rows["bf16"])
    if meta_precision == "fp32":  # auto predicts in the precision the bundle was trained and calibrated in
        assert [r["top1_prob"] for r in rows["auto"]] == [r["top1_prob"] for r in rows["fp32"]]


def test_accumulation_longer_than_a_phase_is_an_error_before_training(tmp_path):
    """192 training images in batches of 64 are 3 batches an epoch: --accum 8 would never step the optimizer in a
    1-epoch phase, and the run end at chance with exit 0. An error instead, naming the way out."""
    from pipelines.errors import ItfitsError
    from pipelines.learners import check_accumulation
    from pipelines.run import FitConfig, fit
    check_accumulation(accum=3, batches=3, bs=64, phase_epochs=[1, 1])
    check_accumulation(accum=8, batches=3, bs=64, phase_epochs=[0, 3])  # 9 batches: one step
    with pytest.raises(ItfitsError, match="--accum 3 or less"):
        check_accumulation(accum=8, batches=3, bs=64, phase_epochs=[1, 5])
    with pytest.raises(ItfitsError, match="never step"):
        fit(FitConfig(data=str(FASHION), out=str(tmp_path / "run"), bs=64, accum=8, epochs=1, freeze_epochs=1,
                      size=32, lr=3e-3, num_workers=0, precision="fp32"), log=lambda *a: None)
    assert not (tmp_path / "run" / "model").exists()


def test_prediction_precision_auto_follows_the_training_and_the_hardware_without_timing(monkeypatch):
    """auto at prediction is the training's precision where the CPU has bf16 instructions, else fp32, and never
    runs the timing probe, whose answer moved with the machine's load (two predictions of one model disagreed)."""
    import pipelines.precision as P
    assert P.cpu_has_bf16() in (True, False, None)  # this machine's answer, read for real

    def no_probe(*args, **kwargs):
        raise AssertionError("prediction's auto precision timed the model")
    monkeypatch.setattr(P, "cpu_step_times", no_probe)
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(P, "cpu_has_bf16", lambda native=native: native)
        assert P.prediction_precision("bf16", arch="efficientnet_lite0", size=64, device="cpu").name == want
        assert P.prediction_precision("fp32", arch="efficientnet_lite0", size=64, device="cpu").name == "fp32"
