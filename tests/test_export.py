"""Exports: TorchScript by tracing and ONNX for Restormer, AMIR and TAT, checked against eager mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medir_monai.deploy import export as ex
from medir_monai.deploy.models import load_bundle_network, load_restoration_model, model_kind
from medir_monai.networks.moe import dense_dispatch
from medir_monai.networks import AMIR, TAT, Restormer

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # exported == eager to 1e-4
TRACED = (1, 1, 32, 32)
TINY = {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 1}
# another batch, another size (divisible by 8), a size that needs the in-graph padding
OTHER_SHAPES = [(2, 1, 32, 32), (1, 1, 48, 40), (1, 1, 30, 27)]


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "restormer":
        return Restormer(**TINY).eval()
    if name == "amir":
        return AMIR(**TINY).eval()
    return TAT(**TINY, train_size=32).eval()  # local-converter windows of 48 at level 1


@pytest.fixture(scope="module")
def onnxruntime():
    return pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e .[deploy])")


# ---- TorchScript -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["restormer", "amir", "tat"])
def test_torchscript_matches_eager_at_the_traced_size(name, tmp_path):
    net = tiny(name)
    path = ex.export_torchscript(net, tmp_path / f"{name}.ts", TRACED, model_name=name.upper())
    exported = torch.jit.load(str(path))
    assert ex.max_abs_difference(net, exported, TRACED, seed=1) <= TOL
    assert ex.max_abs_difference(net, exported, (3, 1, 32, 32), seed=2) <= TOL  # batch is free for every model
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.ts"]  # atomic: no temporary left behind


@pytest.mark.parametrize("name", ["restormer", "amir"])
@pytest.mark.parametrize("shape", OTHER_SHAPES)
def test_size_free_models_match_eager_at_other_sizes(name, shape, tmp_path):
    net = tiny(name)
    exported = torch.jit.load(str(ex.export_torchscript(net, tmp_path / "m.ts", TRACED)))
    assert ex.size_dependence(net) is None
    assert ex.max_abs_difference(net, exported, shape) <= TOL


def test_traced_tat_refuses_other_sizes_with_a_clear_error(tmp_path):
    net = tiny("tat")
    assert "local-converter" in ex.size_dependence(net)
    exported = torch.jit.load(str(ex.export_torchscript(net, tmp_path / "tat.ts", TRACED)))
    with pytest.raises((RuntimeError, torch.jit.Error), match=r"(?s)only valid for inputs of 32x32.*got 80x72"):
        exported(torch.rand(1, 1, 80, 72))


def test_why_tat_needs_the_guard_a_bare_trace_is_silently_wrong_at_other_sizes():
    """The local converter's window layout is frozen at trace time: 80x72 needs several windows at level 1."""
    net = tiny("tat")
    with torch.no_grad():
        bare = torch.jit.trace(net, torch.rand(TRACED), check_trace=False)
    assert ex.max_abs_difference(net, bare, TRACED) <= TOL
    assert ex.max_abs_difference(net, bare, (1, 1, 80, 72)) > 1e-3
    # a size that still fits in one window at every level has the traced layout, and matches
    assert ex.max_abs_difference(net, bare, (1, 1, 48, 40)) <= TOL


def test_traced_amir_uses_dense_expert_dispatch():
    """Sparse dispatch splits tokens by a data-dependent count (bincount); the traced graph must not contain it."""
    net = tiny("amir")
    moes = [m for m in net.modules() if hasattr(m, "dispatch")]
    assert moes and not any(dense_dispatch(m.dispatch, torch.device("cpu")) for m in moes)  # eager CPU: sparse
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.rand(TRACED), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "aten::bincount" not in graph and "aten::gather" in graph


def test_metadata_round_trip_and_model_loading(tmp_path):
    path = ex.export_torchscript(tiny("tat"), tmp_path / "tat.pt", (1, 1, 32, 40), model_name="TAT-tiny")
    model = load_restoration_model(path)
    assert (model.name, model.kind, model.roi_size, model.fixed_size) == ("TAT-tiny", "torchscript", (32, 40), True)
    model = load_restoration_model(ex.export_torchscript(tiny("amir"), tmp_path / "amir.ts", TRACED))
    assert (model.name, model.roi_size, model.fixed_size) == ("AMIR", (32, 32), False)


def test_bad_export_arguments_and_model_paths(tmp_path):
    with pytest.raises(ValueError, match="3 channel.*network takes 1"):
        ex.export_torchscript(tiny("restormer"), tmp_path / "x.ts", (1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ex.export_torchscript(tiny("restormer"), tmp_path / "x.ts", (32, 32))
    junk = tmp_path / "junk.ts"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.ts"):
        model_kind(junk)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_restoration_model(tmp_path / "nothere.ts")
    with pytest.raises(ValueError, match="not a bundle"):
        load_bundle_network(tmp_path)
    assert not list(tmp_path.glob("x.ts*")) and not list(tmp_path.glob(".x.ts*"))


# ---- ONNX --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["restormer", "amir", "tat"])
def test_onnx_matches_eager(name, tmp_path, onnxruntime):
    net = tiny(name)
    model = load_restoration_model(ex.export_onnx(net, tmp_path / f"{name}.onnx", TRACED, model_name=name))
    assert model.kind == "onnx" and model.name == name and model.roi_size == (32, 32)
    assert ex.max_abs_difference(net, model.network, TRACED) <= TOL
    assert ex.max_abs_difference(net, model.network, (2, 1, 32, 32)) <= TOL
    if name == "tat":
        assert model.fixed_size and model.network.input_shape[2:] == [32, 32]
        with pytest.raises(ValueError, match="only accepts 32x32"):
            model.network(torch.rand(1, 1, 48, 40))
    else:
        assert not model.fixed_size
        for shape in OTHER_SHAPES[1:]:
            assert ex.max_abs_difference(net, model.network, shape) <= TOL


# ---- command line over a bundle ------------------------------------------------------------------------------
def test_export_command_over_a_bundle(tmp_path, capsys):
    tiny_cfg = tmp_path / "tiny.json"
    tiny_cfg.write_text(json.dumps({"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1],
                                    "network_def#num_refinement_blocks": 1, "patch_size": [32, 32]}))
    net, _ = load_bundle_network(REPO_ROOT / "bundles" / "amir", config_files=[tiny_cfg], untrained=True)
    ckpt = tmp_path / "w.pt"
    torch.save(net.state_dict(), ckpt)
    argv = ["--bundle", str(REPO_ROOT / "bundles" / "amir"), "--config", str(tiny_cfg), "--checkpoint", str(ckpt),
            "--output-dir", str(tmp_path / "out"), "--check", "40x48"]
    assert ex.main(argv) == 0
    printed = capsys.readouterr().out
    assert "traced at (1, 1, 32, 32); valid at any size" in printed
    diffs = [float(line.rsplit("=", 1)[1]) for line in printed.splitlines() if "max|diff|" in line]
    assert len(diffs) == 3 and max(diffs) <= TOL  # traced size, batch 2, 40x48
    model = load_restoration_model(tmp_path / "out" / "amir.ts")
    assert model.name == "AMIR"
    with torch.no_grad():
        x = torch.rand(1, 1, 32, 32)
        assert torch.allclose(model.network(x), net(x), atol=TOL)  # the checkpoint's weights were exported
    with pytest.raises(SystemExit):
        ex.main(argv[:-2] + ["--check", "40by48"])
