"""``model.weights: torchvision:<Enum>.<MEMBER>`` and ``torchvision:DEFAULT``: torchvision's own
weights by name, fetched by torchvision's loader into torch.hub's cache and loaded as a file is.

Nothing is downloaded: every test has its own empty ``TORCH_HOME`` and torch.hub's downloader
fails as it does with no network. A file placed where torchvision's loader looks (a seeded
MobileNetV3-Small, the smallest of the architectures, not ImageNet's numbers) stands for the
downloaded one.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torchvision.models import MobileNet_V3_Small_Weights
from torchvision.models.video import R2Plus1D_18_Weights

from cli_helpers import run_main
from sideways_cli.models.torchvision_nets import named_weights
from sideways_cli.run.build import build_network, resolve_config
from sideways_cli.support.errors import UserError
from tiny import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

MOBILENET = "torchvision:mobilenet_v3_small"
MEMBER = MobileNet_V3_Small_Weights.IMAGENET1K_V1
NAME = "torchvision:MobileNet_V3_Small_Weights.IMAGENET1K_V1"
CLASSES = 5  # ImageNet's file has 1000: model.new_head keeps the head fresh


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """torchvision's own MobileNetV3-Small state dict, from seed 0 (1000 classes, as ImageNet's)."""
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(weights=None).state_dict()


@pytest.fixture
def downloads(tmp_path, monkeypatch) -> list[str]:
    """An empty torch.hub cache of this test's own, and a downloader that fails as it does with
    no network; returns the URLs it was asked for."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    asked: list[str] = []

    def no_network(url, dst, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return asked


def cache_path(weights) -> Path:
    """Where torch.hub's loader looks for ``weights``' file (torch/hub.py, load_state_dict_from_url)."""
    file_name = os.path.basename(urlparse(weights.url).path)
    return Path(os.path.join(torch.hub.get_dir(), "checkpoints", file_name))


def place(weights, state: dict[str, torch.Tensor]) -> Path:
    """``state`` saved where torchvision's loader will find ``weights``' file: as if downloaded."""
    path = cache_path(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def mobilenet_config(*sets: str):
    return resolve_config(None, [f"model.name={MOBILENET}", "model.norm=frozen", *sets])


def refusal(*sets: str, build: bool = False) -> str:
    """The one-line UserError of reading (``build``: and building) the config of ``sets``."""
    with pytest.raises(UserError) as refused:
        cfg = resolve_config(None, list(sets))
        if build:
            build_network(cfg, CLASSES)
    message = str(refused.value)
    assert len(message.splitlines()) == 1, message
    return message


def assert_starts_from(model, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``model`` below its head is ``state``'s under torchvision's own key."""
    head = f"stack.{len(model) - 1}."
    body = {key: value for key, value in model.state_dict().items() if not key.startswith(head)}
    assert body
    for key, value in body.items():
        torch.testing.assert_close(value, state[key.split(".", 2)[2]], rtol=0, atol=0, msg=key)


def test_named_weights_are_read_from_torch_hubs_cache(reference, downloads):
    place(MEMBER, reference)
    cfg = mobilenet_config(f"model.weights={NAME}", "model.new_head=true")
    assert cfg.model.weights == NAME  # a name, not made a path
    model = build_network(cfg, CLASSES)
    assert_starts_from(model, reference)
    fresh = build_network(mobilenet_config(), CLASSES)  # the head keeps the seeded initialisation
    torch.testing.assert_close(model.stack[-1].state_dict(), fresh.stack[-1].state_dict())
    assert downloads == []  # cached: nothing touched the network


def test_default_is_the_default_of_model_names_architecture(reference, downloads):
    assert named_weights("torchvision:DEFAULT", MOBILENET) is MobileNet_V3_Small_Weights.DEFAULT
    assert named_weights("torchvision:DEFAULT", "torchvision:r2plus1d_18") is \
        R2Plus1D_18_Weights.KINETICS400_V1
    place(MobileNet_V3_Small_Weights.DEFAULT, reference)
    model = build_network(mobilenet_config("model.weights=torchvision:DEFAULT", "model.new_head=true"),
                          CLASSES)
    assert_starts_from(model, reference)
    assert downloads == []


def test_no_cached_file_and_no_network_names_the_url_and_where_to_put_the_file(downloads):
    cfg = mobilenet_config(f"model.weights={NAME}", "model.new_head=true")  # no download yet
    assert downloads == []
    with pytest.raises(UserError) as refused:
        build_network(cfg, CLASSES)
    message = str(refused.value)
    assert downloads == [MEMBER.url]
    assert len(message.splitlines()) == 1
    assert message.startswith(f"model.weights {NAME}: cannot download {MEMBER.url} (")
    assert f"put the file at {cache_path(MEMBER)} (TORCH_HOME sets the folder)" in message
    assert not cache_path(MEMBER).exists()


def test_a_checkpoints_network_is_built_without_fetching(downloads):
    """eval, predict and fidelity --run build with pretrained=False: the checkpoint's weights
    replace every tensor, so torchvision's are neither read nor downloaded."""
    cfg = mobilenet_config(f"model.weights={NAME}", "model.new_head=true")
    build_network(cfg, CLASSES, pretrained=False)
    assert downloads == []


def test_a_damaged_or_unsafe_cached_file_is_named(downloads):
    path = cache_path(MEMBER)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    sets = [f"model.name={MOBILENET}", "model.norm=frozen", f"model.weights={NAME}", "model.new_head=true"]
    message = refusal(*sets, build=True)
    assert f"{path} is not a state dict torch.load(weights_only=True) can read" in message
    assert "delete it to download it again" in message

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this must not run",))

    torch.save({"features.0.0.weight": RunsCode()}, path)
    message = refusal(*sets, build=True)
    assert f"{path} holds the object posix.system" in message and "could run code" in message
    assert downloads == []


def test_a_head_for_another_class_count_needs_new_head(reference, downloads):
    place(MEMBER, reference)
    message = refusal(f"model.name={MOBILENET}", "model.norm=frozen", f"model.weights={NAME}", build=True)
    assert message.startswith(f"model.weights {NAME}: key 'stack.13.classifier.3.weight' has shape "
                              "[1000, 1024] in the file, [5, 1024] in the network")
    assert "--set model.new_head=true" in message


@pytest.mark.parametrize("sets, says", [
    (["model.name=torchvision:r2plus1d_18", "model.norm=frozen",
      "model.weights=torchvision:ResNet18_Weights.IMAGENET1K_V1"],
     "torchvision:ResNet18_Weights.IMAGENET1K_V1 are weights of another architecture (ResNet18_Weights), "
     "not of model.name torchvision:r2plus1d_18 (R2Plus1D_18_Weights); set model.weights to one of "
     "torchvision:R2Plus1D_18_Weights.KINETICS400_V1, torchvision:DEFAULT (KINETICS400_V1)"),
    ([f"model.name={MOBILENET}", "model.norm=frozen",
      "model.weights=torchvision:MobileNet_V3_Small_Weights.V9"],
     "torchvision has no weights 'MobileNet_V3_Small_Weights.V9'; torchvision:mobilenet_v3_small's are "
     "torchvision:MobileNet_V3_Small_Weights.IMAGENET1K_V1, torchvision:DEFAULT (IMAGENET1K_V1)"),
    ([f"model.name={MOBILENET}", "model.norm=frozen", "model.weights=torchvision:IMAGENET1K_V1"],
     "torchvision has no weights 'IMAGENET1K_V1'"),
    (["model.name=c3d", "model.weights=torchvision:DEFAULT"],
     "'model.weights' is torchvision:DEFAULT, torchvision's weights, which only a torchvision network "
     "takes, and model.name is 'c3d'"),
    ([f"model.name={MOBILENET}", f"model.weights={NAME}"],
     "'model.norm' is group, which replaces BatchNorm and has no place for the BatchNorm statistics "
     f"{NAME} holds; set model.norm=frozen"),
])
def test_a_name_that_does_not_fit_is_refused_when_the_config_is_read(sets, says, downloads):
    assert says in refusal(*sets)
    assert downloads == []


def test_vgg_without_batchnorm_takes_named_weights_with_either_norm(downloads):
    cfg = resolve_config(None, ["model.name=torchvision:vgg11", "model.weights=torchvision:DEFAULT"])
    assert cfg.model.norm == "group" and cfg.model.weights == "torchvision:DEFAULT"


def test_train_without_network_exits_with_one_line(tmp_path, downloads, monkeypatch, capsys):
    path = tiny_run_config(tmp_path, {
        "model": {"name": MOBILENET, "norm": "frozen", "weights": "torchvision:DEFAULT",
                  "new_head": True, "temporal_kernel": None, "width": None},
        "data": {"size": 16, "clip_len": 4, "batch_size": 2}, "train": {"steps": 2}})
    code, err = run_main(["train", path, "--out", tmp_path / "run", "--quiet"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert f"cannot download {MEMBER.url}" in err and str(cache_path(MEMBER)) in err
    assert downloads == [MEMBER.url]


def test_a_jobs_first_process_fetches_the_file_into_the_cache_once(downloads, reference, monkeypatch):
    """fetch_named_weights: what a job's first process runs before the others build the network,
    which then find the file in the cache. Here the 'download' writes the reference file."""
    from sideways_cli.run.build import fetch_named_weights

    def download(url, dst, *args, **kwargs):
        downloads.append(url)
        torch.save(reference, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    cfg = mobilenet_config(f"model.weights={NAME}", "model.new_head=true")
    fetch_named_weights(cfg)
    assert downloads == [MEMBER.url] and cache_path(MEMBER).is_file()
    build_network(cfg, CLASSES)  # from the cache: no second download
    assert downloads == [MEMBER.url]
    fetch_named_weights(resolve_config(None, []))  # no named weights: nothing to fetch
    assert downloads == [MEMBER.url]
