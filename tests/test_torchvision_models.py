"""torchvision's classification models as ``tv:<name>``: the import shim, build_model, fx, the CLI."""
import sys

import pytest
import torch

from pyoptim import cli
from pyoptim.models import build_model, classification_models
from pyoptim.models import torchvision_zoo as tvz

try:
    tvz.import_torchvision()
except ImportError as exc:
    pytest.skip(f"torchvision is absent ({exc})", allow_module_level=True)


def test_the_shim_imports_torchvision_and_its_two_fake_registered_ops_exist():
    tv = tvz.import_torchvision()
    assert tv is sys.modules["torchvision"] and tv.__version__.startswith("0.28")
    assert tvz.import_torchvision() is tv             # a second call is the same module
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    # the shim declares schemas only where torchvision's own _C did not load
    assert (tvz._SHIM_LIBRARY is None) == tv.extension._has_ops()


def test_classification_models_filters_by_size():
    small = classification_models(max_params=10e6)
    every = classification_models(max_params=float("inf"))
    assert "mobilenet_v3_small" in small and "resnet50" not in small and "resnet50" in every
    assert set(small) <= set(classification_models()) <= set(every)
    assert not any(n.startswith(("fasterrcnn", "fcn_", "r3d_")) for n in every)   # classification only
    with pytest.raises(ValueError, match="max_params"):
        classification_models(max_params=0)


def test_mobilenet_v3_small_on_one_channel_images_traces_with_fx():
    torch.manual_seed(0)
    model = build_model("tv:mobilenet_v3_small", 10, 1)
    assert isinstance(model.adapter, tvz.ChannelRepeat) and not list(model.adapter.parameters())
    x = torch.randn(2, 1, 28, 28)
    out = model.eval()(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # the adapter is exact: the grey image on each of the three channels the stem reads
    torch.testing.assert_close(out, model.net(x.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), out)


def test_the_channel_graph_reads_it_with_the_input_fixed_and_the_rest_prunable():
    from pyoptim.prune import ChannelGraph
    graph = ChannelGraph(build_model("tv:mobilenet_v3_small", 10, 1), torch.randn(2, 1, 28, 28))
    fixed = [g for g in graph.groups if not g.prunable]
    assert any(g.size == 1 and any("model input" in r for r in g.reasons) for g in fixed)
    assert len(graph.prunable_groups()) >= 20
    assert graph.group_of("net.features.0.0", "producer").prunable      # the stem's out-channels


def test_three_channels_give_torchvision_s_module_and_other_counts_a_1x1_conv():
    tv = tvz.import_torchvision()
    assert isinstance(build_model("tv:mobilenet_v3_small", 7, 3), tv.models.MobileNetV3)
    model = build_model("tv:mobilenet_v3_small", 7, 4)
    assert isinstance(model.adapter, torch.nn.Conv2d) and model.adapter.weight.shape == (3, 4, 1, 1)
    assert model.eval()(torch.randn(1, 4, 32, 32)).shape == (1, 7)


def test_googlenet_is_built_without_its_auxiliary_heads():
    model = build_model("tv:googlenet", 5, 3).train()
    assert isinstance(model(torch.randn(2, 3, 64, 64)), torch.Tensor)


@pytest.mark.parametrize("args, argument", [
    (("tv:nope", 10, 1), "name"), (("tv:mobilenet_v3_smal", 10, 1), "did you mean mobilenet_v3_small"),
    (("tv:resnet18", 0, 1), "num_classes"), (("tv:resnet18", 10, 0), "in_channels"),
    (("tv:resnet18", 10, 1, 0.5), "width"), (("resnet19", 10, 1), "name must be one of"),
])
def test_bad_names_and_arguments_raise_naming_the_argument(args, argument):
    with pytest.raises(ValueError, match=argument):
        build_model(*args)


@pytest.mark.parametrize("model", ["tv:nope", "nope"])
def test_the_cli_refuses_an_unknown_model_when_parsed_in_one_line(model, capsys, monkeypatch):
    import pyoptim.cli.run as run
    monkeypatch.setattr(run, "_load_data", lambda *a: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "synthetic", "--model", model])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyoptim train: error: argument --model"), err
    assert repr(model) in err[0] and "Traceback" not in err[0]


def test_the_cli_accepts_tv_names_and_refuses_a_width_for_them(monkeypatch):
    import pyoptim.cli.run as run
    args = cli.build_parser().parse_args(["train", "--model", "tv:mobilenet_v3_small", "--data", "synthetic"])
    assert args.model == "tv:mobilenet_v3_small"
    assert cli.build_parser().parse_args(["energy", "profile", "--model", "tv:resnet18"]).model == "tv:resnet18"
    monkeypatch.setattr(run, "_load_data", lambda *a: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit, match="--width"):
        cli.main(["train", "--model", "tv:mobilenet_v3_small", "--data", "synthetic", "--width", "0.5"])


def test_a_missing_torchvision_is_an_import_error_saying_how_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.setattr(tvz.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps torchvision==0\.28\.0"):
        tvz.import_torchvision()


def test_make_bench_prunetrain_tv_arguments_parse(monkeypatch):
    """The Makefile's ``bench-prunetrain-tv`` command lines parse, and the stored dense run has the
    PruneTrain run's recipe (``--compare-to`` accepts it)."""
    import os
    import re
    import shlex
    from pyoptim.cli.train import check_same_recipe
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "Makefile")).read().replace("\\\n", " ")
    var = {m.group(1): m.group(2).strip() for m in re.finditer(r"^(TV_\w+)\s*[?:]=(.*)$", text, re.M)}
    monkeypatch.chdir(root)
    argv = shlex.split(f"{var['TV_RECIPE']} {var['TV_PRUNE']} --compare-to {var['TV_RESULT']}_dense_cpu.json")
    args = cli.build_parser().parse_args(["train"] + argv)
    assert args.model == "tv:mobilenet_v3_small" and args.method == "prunetrain"
    assert args.compare_to["config"]["method"] == "dense"
    check_same_recipe(args, args.compare_to)
