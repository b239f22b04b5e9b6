"""torchvision's networks as frame-step stacks (``model.name: torchvision:<arch>``), their norms
(``model.norm``) and starting weights (``model.weights``, ``model.new_head``).

Each adapter keeps the frame-step contract: the tick path is the whole clip (docs/sideways.md,
property 1), no output sees a later frame or another clip of the batch, whichever norm replaces
BatchNorm. The per-frame ones loaded with a torchvision state dict give torchvision's own logits
for every frame, which proves the key mapping. The smallest architectures, tiny clips, float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
import torchvision.models.video as tvv
import yaml

from cli_helpers import invoke, run_main
from sideways_cli.config import NORMS as CONFIG_NORMS
from sideways_cli.engine.contract import contract_rows, failures
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.models.norms import NORMS, FrozenBatchNorm, trainable_batchnorm
from sideways_cli.models.torchvision_nets import ARCHS, AdaptiveMean
from sideways_cli.models.torchvision_video import VideoHead
from sideways_cli.run.build import build_network, resolve_config
from sideways_cli.support.errors import UserError
from tiny import tiny_run_config

IMAGE_NETS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "vgg11"]
VIDEO_NETS = ["r3d_18", "mc3_18", "r2plus1d_18"]
# no dropout or stochastic depth, so that train mode is a function of its input
# (and VGG skips its second initialisation: seconds, for weights that model.weights replaces)
ARGS = {"mobilenet_v3_small": {"dropout": 0.0}, "vgg11": {"dropout": 0.0, "init_weights": False},
        "efficientnet_b0": {"dropout": 0.0, "stochastic_depth_prob": 0.0}}
CLASSES = 5
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


def torchvision_net(arch: str) -> torch.nn.Module:
    """torchvision's own network from seed 0 in eval mode, its BatchNorm statistics those of
    random images (at their initial 0 and 1 a deep network's output would barely depend on its
    input) and its affine parameters away from 1 and 0, so that a wrong mapping of them shows."""
    torch.manual_seed(0)
    net = getattr(tvv if arch in VIDEO_NETS else tvm, arch)(weights=None, num_classes=CLASSES,
                                                            **ARGS.get(arch, {}))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # the statistics of exactly the one batch below
    shape = (2, 3, 4, 8, 8) if arch in VIDEO_NETS else (4, 3, 32, 32)
    with torch.no_grad():
        net.train()(torch.randn(shape))
        for bn in norms:
            bn.momentum = 0.1
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
    return net.eval()


# VGG's 25088 x 4096 classifier takes seconds to cast, copy and save in float64, and R(2+1)D's
# weight-standardised 3D convolutions seconds per pass: float32, with the float32 tolerance of
# property 1 (docs/sideways.md)
PRECISION = {"vgg11": "float32", "r2plus1d_18": "float32"}


def config(arch: str, *sets: str):
    """The config of ``torchvision:<arch>`` (float64 but for VGG) with ``sets`` as --set gives."""
    args = [f"model.args.{k}={v}" for k, v in ARGS.get(arch, {}).items()]
    return resolve_config(None, [f"model.name=torchvision:{arch}", *args,
                                 f"precision={PRECISION.get(arch, 'float64')}", *sets])


class Networks:
    """Each (arch, norm) built once per module (VGG's classifier alone takes seconds). The frozen
    per-frame networks start from torchvision's own (``reference``) through model.weights."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[tuple[str, str], torch.nn.Module] = {}
        self.references: dict[str, torch.nn.Module] = {}

    def reference(self, arch: str) -> torch.nn.Module:
        if arch not in self.references:
            self.references[arch] = torchvision_net(arch)
        return self.references[arch]

    def weights_file(self, arch: str) -> Path:
        path = self.root / f"{arch}.pt"
        if not path.is_file():
            torch.save(self.reference(arch).state_dict(), path)
        return path

    def __call__(self, arch: str, norm: str) -> torch.nn.Module:
        if (arch, norm) not in self.built:
            sets = [f"model.norm={norm}"]
            if norm == "frozen" and arch in IMAGE_NETS:
                sets.append(f"model.weights={self.weights_file(arch)}")
            self.built[arch, norm] = build_network(config(arch, *sets), CLASSES)
        return self.built[arch, norm]


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    nets = Networks(tmp_path_factory.mktemp("torchvision"))
    yield nets
    nets.built.clear()  # half a gigabyte for VGG: not kept for the rest of the session
    nets.references.clear()


def clip(arch: str, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    """2 clips of 3 frames of 32 pixels (VGG's five max-pools need them), of 8 pixels for the
    video networks, whose float64 3D convolutions are slow on a CPU."""
    frames, size = 3, 8 if arch in VIDEO_NETS else 32
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, frames, size, size, generator=g, dtype=torch.float64).to(dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None) -> None:
    """Equal to rtol 1e-6 in float64 (1e-5 in float32); the absolute tolerance scales with the
    logits, ~0.01 from a fresh head."""
    if rtol is None:
        rtol = 1e-6 if expected.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


# (arch, norm, gradients too). vgg11 has no BatchNorm: both norms build one network. The
# weight-standardised float64 convolutions of torchvision's 3D widths take seconds per pass on a
# CPU: the video networks' forward properties with group norms once (r2plus1d_18: its preset's;
# r3d_18 shares its blocks), frozen for all three, the gradients where they are cheap
SLOW = pytest.mark.slow  # seconds each: the full suite checks them, make test-fast their kin
# make test-fast keeps one image network with gradients, one without and one video network
CONTRACT = [("mobilenet_v3_small", "group", True),
            pytest.param("mobilenet_v3_small", "frozen", True, marks=SLOW),
            ("resnet18", "group", False), pytest.param("resnet18", "frozen", True, marks=SLOW),
            pytest.param("efficientnet_b0", "group", False, marks=SLOW),
            pytest.param("efficientnet_b0", "frozen", True, marks=SLOW),
            pytest.param("vgg11", "frozen", False, marks=SLOW),
            pytest.param("r2plus1d_18", "group", False, marks=SLOW),
            ("r2plus1d_18", "frozen", False), pytest.param("r3d_18", "frozen", False, marks=SLOW),
            pytest.param("mc3_18", "group", False, marks=SLOW),
            pytest.param("mc3_18", "frozen", True, marks=SLOW)]


@pytest.mark.parametrize("arch, norm, gradients", CONTRACT)
def test_every_adapter_keeps_the_frame_step_contract(arch, norm, gradients, networks):
    """What `sideways check` verifies, in train mode: per module, the tick path equals the whole
    clip (property 1), causal, per clip, no batch statistics; the network's pipelined forward;
    and with ``gradients`` Sideways == BP on a static video for the per-frame networks
    (property 3) and the top module exact (property 4). 3 frames: every slot of a 9-frame window
    takes part through the zero-padded start."""
    model = networks(arch, norm)
    x = clip(arch, model.dtype)
    rows = contract_rows(model, x, torch.tensor([1, 3]), OBJECTIVES["classify"], "", gradients)
    assert not failures(rows), failures(rows)
    assert model(x).shape == (2, CLASSES, x.shape[2])
    static = {r.ok for r in rows if r.property == "static: sideways == bp"}
    assert static == (set() if not gradients else {None} if arch in VIDEO_NETS else {True})


@pytest.mark.parametrize("arch", [arch if arch != "vgg11" else pytest.param(arch, marks=SLOW)
                                  for arch in IMAGE_NETS])
@torch.no_grad()
def test_torchvision_weights_give_torchvision_logits_for_every_frame(arch, networks):
    """Through model.weights, with frozen norms: the key mapping is the identity on torchvision."""
    model = networks(arch, "frozen").eval()
    reference = networks.reference(arch).to(model.dtype)
    x = clip(arch, model.dtype)
    ours = model(x)
    for t in range(x.shape[2]):
        close(ours[:, :, t], reference(x[:, :, t]))


# the pools that CUDA cannot differentiate deterministically: a --deterministic run would stop
ADAPTIVE_POOLS = (torch.nn.modules.pooling._AdaptiveAvgPoolNd, torch.nn.modules.pooling._AdaptiveMaxPoolNd)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=SLOW) if a == "vgg11" else a  # seconds to build
                                  for a in IMAGE_NETS + VIDEO_NETS])
def test_no_adapted_network_holds_an_adaptive_pool(arch, networks):
    """torchvision's adaptive average pools (heads, squeeze-and-excitation) become means; the
    logits test above shows they give torchvision's numbers. The norm plays no part: the frozen
    networks, built already."""
    model = networks(arch, "frozen")
    assert [name for name, m in model.named_modules() if isinstance(m, ADAPTIVE_POOLS)] == []
    if arch in IMAGE_NETS:
        assert isinstance(model.stack[-1].avgpool, AdaptiveMean)


@pytest.mark.parametrize("size, output_size", [((5, 7), 1), ((1, 1), (7, 7)), ((7, 7), (7, 7)),
                                               ((10, 13), (7, 7)), ((14, 9), (7, None))])
def test_adaptive_mean_is_the_adaptive_pool(size, output_size):
    """Global (heads, squeeze-and-excitation) and VGG's 7x7 from any map, values and gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64, requires_grad=True)
    ours, theirs = AdaptiveMean(output_size)(x), torch.nn.AdaptiveAvgPool2d(output_size)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)
    message = torch.randn(theirs.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, message)[0] for y in (ours, theirs)),
                               rtol=1e-14, atol=1e-15)


def test_the_video_head_is_torchvisions_spatial_pool_and_fc_per_frame():
    g = torch.Generator().manual_seed(0)
    fc = torch.nn.Linear(6, CLASSES).double()
    x = torch.randn(2, 6, 3, 4, 5, generator=g, dtype=torch.float64)
    pooled = torch.nn.AdaptiveAvgPool3d((None, 1, 1))(x).flatten(2).transpose(1, 2)  # [B, T, C]
    torch.testing.assert_close(VideoHead(fc)(x), fc(pooled).transpose(1, 2), rtol=1e-14, atol=1e-15)


WINDOWS = {"r3d_18": [3, 9, 9, 9, 9, 1], "mc3_18": [3, 9, 1, 1, 1, 1],
           "r2plus1d_18": [3, 9, 9, 9, 9, 1]}


@pytest.mark.parametrize("arch", VIDEO_NETS)
def test_video_state_dict_keys_are_torchvision_keys_under_their_module(arch, networks):
    model = networks(arch, "frozen")
    reference = networks.reference(arch).state_dict()
    ours = model.state_dict()
    assert [k.split(".", 2)[2] for k in ours] == list(reference)
    assert all(ours[k].shape == reference[k.split(".", 2)[2]].shape for k in ours)
    assert [k.split(".")[1] for k in ours if k.endswith("fc.weight")] == [str(len(model) - 1)]
    assert model.names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    # one frame plus what each stage's temporal convolutions consume (3 per conv of kernel 3)
    assert model.windows == WINDOWS[arch]


def test_group_norm_standardises_the_convolutions_and_keeps_torchvision_keys(networks):
    model = networks("resnet18", "group")
    names = dict(model.named_modules())
    assert type(names["stack.0.conv1"]).__name__ == "StandardizedConv2d"
    assert type(names["stack.0.bn1"]).__name__ == "FrameGroupNorm"
    keys = {k.split(".", 2)[2] for k in model.state_dict()}
    assert keys == {k for k in networks.reference("resnet18").state_dict()
                    if k.rpartition(".")[2] not in ("running_mean", "running_var", "num_batches_tracked")}
    assert model.names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert not trainable_batchnorm(model)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode():
    bn = torch.nn.BatchNorm3d(4).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm(4).double()
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64)
    frozen.train()(x)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    torch.testing.assert_close(frozen(x[:, :, 0]), bn(x[:, :, :1])[:, :, 0])
    torch.testing.assert_close(frozen.running_mean, bn.running_mean)


# -- refusals: one line, naming the key ----------------------------------------------------------

BATCHNORM_NET = '''
from torch import nn
from sideways_cli.models import ClassifierHead, ConvUnit, FrameStack, PerFrame
from sideways_cli.models.blocks import FrameModule


class Normed(FrameModule):
    def __init__(self):
        super().__init__()
        self.body = PerFrame(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def valid(self, x):
        return self.body(x)


def build(num_classes):
    return FrameStack([ConvUnit(3, 4), Normed(), ClassifierHead(4, num_classes)],
                      ["conv", "normed", "head"])
'''


def test_a_builder_with_trainable_batchnorm_is_refused_naming_the_module(networks, runs, tmp_path,
                                                                       monkeypatch, capsys):
    (tmp_path / "bn_net.py").write_text(BATCHNORM_NET)
    cfg = resolve_config(None, [f"model.name={tmp_path / 'bn_net.py'}", "data.size=16"])
    model = build_network(cfg, CLASSES)
    assert trainable_batchnorm(model) == [(1, "normed", "body.body.1")]
    assert trainable_batchnorm(networks("resnet18", "group")) == []
    assert trainable_batchnorm(networks("resnet18", "frozen")) == []
    # train refuses it before its first step, in one line (sideways check shows it as a row)
    path = run_config(runs, "bn.yaml", {"name": str(tmp_path / "bn_net.py")})
    code, err = run_main(["train", path, "--out", tmp_path / "run"], monkeypatch, capsys)
    assert code == 2 and "module 1 (normed), no batch statistics" in err and "GroupNorm" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("sets, says", [
    (["model.name=torchvision:resnet7"], "unknown torchvision architecture; supported: resnet18"),
    (["model.name=torchvision:resnet18", "task=reconstruct"], "torchvision:resnet18 is a classifier"),
    (["model.name=torchvision:resnet18", "model.args.num_classes=3"], "'model.args.num_classes'"),
    (["model.name=torchvision:resnet18", "model.norm=batch"], "'model.norm' must be one of group, frozen"),
    (["model.name=torchvision:resnet18", "model.weights=nowhere.pt"], "'model.weights': no file"),
    (["model.new_head=true"], "'model.new_head' keeps the head fresh when loading model.weights"),
])
def test_torchvision_settings_are_checked_when_the_config_is_read(sets, says):
    with pytest.raises(UserError) as refused:
        resolve_config(None, sets)
    assert says in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_a_wrong_torchvision_argument_is_one_line():
    cfg = resolve_config(None, ["model.name=torchvision:resnet18", "model.args.depth=3"])
    with pytest.raises(UserError, match=r"resnet18\(weights=None, num_classes=5, depth=3\) "
                                        r"raised TypeError: .*'depth'"):
        build_network(cfg, CLASSES)


def test_model_weights_is_made_absolute_and_norms_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"")
    cfg = resolve_config(None, ["model.name=torchvision:resnet18", "model.weights=w.pt"])
    assert cfg.model.weights == str(tmp_path / "w.pt")
    assert CONFIG_NORMS == NORMS
    assert set(IMAGE_NETS + VIDEO_NETS) <= set(ARCHS)


def test_model_weights_starts_a_zoo_network_too(tmp_path):
    """Any network: a c3d from seed 1's weights is seed 1's network, whatever the run's seed."""
    sets = ["model.name=c3d", "model.width=4", "model.depth=2"]
    seeded = build_network(resolve_config(None, [*sets, "seed=1"]), CLASSES)
    path = saved(tmp_path / "c3d.pt", seeded.state_dict())
    loaded = build_network(resolve_config(None, [*sets, f"model.weights={path}"]), CLASSES)
    for (key, a), b in zip(loaded.state_dict().items(), seeded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def saved(path: Path, state: dict[str, torch.Tensor], wrap: str | None = None) -> Path:
    torch.save({wrap: state} if wrap else state, path)
    return path


def weights_error(path: Path, *sets: str) -> str:
    cfg = resolve_config(None, ["model.name=torchvision:resnet18", "model.norm=frozen",
                                f"model.weights={path}", *sets])
    with pytest.raises(UserError) as refused:
        build_network(cfg, CLASSES)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(path) in message
    return message


@SLOW
def test_model_weights_must_fit_the_network_key_by_key(networks, tmp_path):
    state = networks.reference("resnet18").float().state_dict()
    missing = {k: v for k, v in state.items() if k != "layer2.0.bn1.weight"}
    assert "missing key 'stack.2.layer2.0.bn1.weight'" in weights_error(saved(tmp_path / "m.pt", missing))
    extra = {**state, "layer9.weight": torch.zeros(1)}
    assert "unexpected key 'layer9.weight'" in weights_error(saved(tmp_path / "u.pt", extra))
    shaped = {**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    message = weights_error(saved(tmp_path / "s.pt", shaped))
    assert ("key 'stack.1.layer1.0.conv1.weight' has shape [64, 64, 1, 1] in the file, "
            "[64, 64, 3, 3] in the network") in message
    group = weights_error(saved(tmp_path / "g.pt", state), "model.norm=group")
    assert "unexpected key 'bn1.running_mean'" in group
    assert "model.norm: frozen keeps BatchNorm statistics" in group


def test_new_head_loads_all_but_the_head(networks, tmp_path):
    """A run's checkpoint (FrameStack keys, under 'model') for another class count: the head is a
    shape mismatch that names the fix; with model.new_head it keeps its fresh initialisation."""
    source = networks("resnet18", "frozen")
    path = saved(tmp_path / "last.pt", source.state_dict(), wrap="model")
    sets = ["model.name=torchvision:resnet18", "model.norm=frozen", "seed=4"]
    with pytest.raises(UserError, match=r"key 'stack.5.fc.weight' has shape \[5, 512\] in the file, "
                                        r"\[7, 512\] in the network; .*--set model.new_head=true"):
        build_network(resolve_config(None, [*sets, f"model.weights={path}"]), CLASSES + 2)
    model = build_network(resolve_config(None, [*sets, f"model.weights={path}", "model.new_head=true"]),
                          CLASSES + 2)
    fresh = build_network(resolve_config(None, sets), CLASSES + 2)
    torch.testing.assert_close(model.stack[-1].fc.weight, fresh.stack[-1].fc.weight)
    torch.testing.assert_close(model.stack[1].layer1[0].conv1.weight,
                               source.stack[1].layer1[0].conv1.weight.float())
    torch.testing.assert_close(model.stack[0].bn1.running_var, source.stack[0].bn1.running_var.float())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A directory holding the smallest embedded dataset, generated once for this module."""
    root = tmp_path_factory.mktemp("runs")
    run_config(root, "tiny.yaml", {}, generate=True)
    return root


def run_config(root: Path, name: str, model: dict, generate: bool = False) -> Path:
    """A run of 2 steps on 2 clips of 4 frames of 16 pixels, ``model`` the model section."""
    return tiny_run_config(root, {"model": model, "data": {"size": 16, "clip_len": 4, "batch_size": 2},
                                  "train": {"steps": 2}, "eval": {"clips_per_video": 1}},
                           name=name, generate=generate)


@pytest.mark.slow
def test_training_a_torchvision_network_through_the_cli(runs, tmp_path, monkeypatch, capsys):
    path = run_config(runs, "tv.yaml", {"name": "torchvision:resnet18", "norm": "frozen"})
    code, err = run_main(["train", path, "--set", "model.weights=none.pt", "--out", tmp_path / "x"],
                         monkeypatch, capsys)
    assert code == 2 and "model.weights" in err and len(err.strip().splitlines()) == 1
    run = tmp_path / "run"
    invoke("train", path, "--out", run, "--quiet")
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    saved_config = yaml.safe_load((run / "config.yaml").read_text())
    assert saved_config["model"]["name"] == "torchvision:resnet18"
    assert saved_config["model"]["norm"] == "frozen"
