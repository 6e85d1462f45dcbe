"""The DiffCode bundle: three training stages, evaluation and inference on a tiny authors'-layout dataset."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from monai.bundle import ConfigWorkflow
from test_bundles import _events, _write_layout

from medir_monai.data.batches import LatentTargetBatch, prepare_hq_task_batch, prepare_task_batch
from medir_monai.handlers.diffcode import MissingStageError, SampleSeedHandler, ScanTaskHandler, require_stage_files
from medir_monai.losses import CodebookStageLoss, DiffCodeLoss
from medir_monai.networks.diffcode import CodebookReconstruction, DiffCode, DiffCodeAutoencoder, LatentDiffusion

CONFIGS = REPO_ROOT / "bundles" / "diffcode" / "configs"
SCHEMA = REPO_ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"
TASKS = ("mri_sr", "ct_denoise", "pet_synthesis")

# network sizes: valid for train.json and inference.json alike
TINY_NET = {
    "autoencoder_def#num_embeddings": 16,
    "autoencoder_def#embedding_dim": 8,
    "autoencoder_def#depth": 2,
    "autoencoder_def#channels": [8, 8, 8, 8],
    "autoencoder_def#num_blocks": [1, 1, 1, 1],
    "diffusion_def#hidden_dim": 16,
    "network_def#channels": [8, 8, 8, 8],
    "network_def#num_blocks": [1, 1, 1, 1],
    "network_def#classifier_channels": [4],
    "patch_size": [32, 32],
}
TINY_TRAIN = {
    **TINY_NET,
    "batch_size": 3,
    "max_iterations": 4,
    "val_interval": 2,
    "val_max_per_task": 1,
    "val_sw_batch_size": 8,
    "stage1_max_iterations": 4,
    "stage1_val_interval": 2,
    "stage2_max_iterations": 4,
    "stage2_val_interval": 2,
    "num_workers": 0,
}


def _run(files, run_id, workflow_type="train", **overrides):
    files = [str(f) for f in files]
    workflow = ConfigWorkflow(config_file=files, workflow_type=workflow_type, run_id=run_id, **overrides)
    workflow.initialize()
    result = workflow.run()
    workflow.finalize()
    return workflow, result


def _missing_stage_error(err: BaseException) -> MissingStageError | None:
    while err is not None:
        if isinstance(err, MissingStageError):
            return err
        err = err.__cause__ or err.__context__
    return None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_layout(tmp_path_factory.mktemp("diffcode_layout"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    """Stage I, II and III of the bundle run one after the other in one bundle root (a few iterations each)."""
    root = tmp_path_factory.mktemp("diffcode_bundle")
    overrides = {**TINY_TRAIN, "dataset_dir": str(dataset), "bundle_root": str(root)}
    for run_id in ("train_stage1", "train_stage2", "training"):
        _run([CONFIGS / "train.json"], run_id, **overrides)
    return root


# ---- the bundle end to end ----------------------------------------------------------------------------------
def test_stage1_saves_codebook_autoencoder_and_reports_per_task(trained):
    state = torch.load(trained / "models" / "stage1.pt", weights_only=True)
    ae = DiffCodeAutoencoder(num_embeddings=16, embedding_dim=8, depth=2, channels=(8, 8, 8, 8), num_blocks=(1, 1, 1, 1))
    ae.load_state_dict(state)  # the file is the bare autoencoder (what stage II / III load)
    assert torch.isfinite(state["quantizer.codebooks"]).all()
    report = (trained / "runs" / "stage1" / "stage1_report.md").read_text()
    for task in TASKS:  # each task's codebook was used: the task index reached the network
        row = next(line for line in report.splitlines() if line.startswith(f"| {task} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0 < float(cells[1]) < 100  # reconstruction PSNR
        assert int(cells[5]) > 0 and int(cells[5]) + int(cells[6]) == 16  # used + dead codes = codebook size
    acc = _events(trained / "runs" / "stage1")
    scalars = set(acc.Tags()["scalars"])
    for tag in ("loss", "l1", "vq", "codebook", "commitment", "val_mean_psnr"):
        assert tag in scalars, (tag, sorted(scalars))
    for task in TASKS:
        assert f"val_psnr_{task}" in scalars and f"codebook/perplexity/{task}" in scalars
        assert f"codebook/dead_codes/{task}" in scalars
        assert all(e.value >= 1.0 for e in acc.Scalars(f"codebook/perplexity/{task}"))


def test_stage2_saves_latent_diffusion_and_validates_the_prior(trained):
    state = torch.load(trained / "models" / "stage2.pt", weights_only=True)
    LatentDiffusion(embedding_dim=8, channels=(8, 8, 8, 8), num_blocks=(1, 1, 1, 1), hidden_dim=16).load_state_dict(state)
    acc = _events(trained / "runs" / "stage2")
    scalars = set(acc.Tags()["scalars"])
    assert {"latent_l1", "val_mean_psnr", "val_lq_psnr_ct_denoise"} <= scalars, sorted(scalars)
    report = (trained / "runs" / "stage2" / "validation_report.md").read_text()
    assert "LQ input" in report and "DiffCode prior (stage II)" in report


def test_stage3_trains_backbone_with_frozen_prior(trained):
    models = trained / "models"
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    final = torch.load(models / "model_final.pt", weights_only=True)
    stage1 = torch.load(models / "stage1.pt", weights_only=True)
    stage2 = torch.load(models / "stage2.pt", weights_only=True)
    assert all(torch.equal(final[f"autoencoder.{k}"], v) for k, v in stage1.items())  # loaded and kept frozen
    assert all(torch.equal(final[f"diffusion.{k}"], v) for k, v in stage2.items())
    ckpt = torch.load(models / "checkpoint_iteration=4.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 4
    acc = _events(trained / "runs")
    scalars = set(acc.Tags()["scalars"])
    for tag in ("loss", "gate_max", "val_mean_psnr", *(f"val_psnr_{t}" for t in TASKS)):
        assert tag in scalars, (tag, sorted(scalars))
    assert all(0.25 <= e.value <= 1.0 for e in acc.Scalars("gate_max"))  # the largest of 4 gate probabilities
    assert any(t.startswith("routing/srm4/") for t in acc.Tags()["histograms"])  # 4 routing modules logged


def test_evaluate_writes_metrics_and_report(trained, dataset):
    overrides = {**TINY_TRAIN, "dataset_dir": str(dataset), "bundle_root": str(trained)}
    _run([CONFIGS / "train.json", CONFIGS / "evaluate.json"], "evaluating", workflow_type="eval", **overrides)
    with open(trained / "eval" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3 * 2  # 2 test slices x 3 tasks x (restored, lq)
    assert {r["task"] for r in rows} == set(TASKS) and {r["source"] for r in rows} == {"restored", "lq"}
    for row in rows:
        assert 0 < float(row["psnr"]) < 100 and -1 <= float(row["ssim"]) <= 1 and float(row["rmse"]) >= 0
    report = (trained / "eval" / "report.md").read_text()
    assert "LQ input" in report and "| DiffCode |" in report and "Average PSNR" in report


def test_inference_restores_scans_with_the_given_task(trained, dataset, tmp_path):
    out = tmp_path / "restored"
    overrides = {**TINY_NET, "bundle_root": str(trained), "ckpt_dir": str(trained / "models"), "task": "pet_synthesis",
                 "dataset_dir": str(dataset / "PET" / "test" / "LQ"), "output_dir": str(out)}
    workflow, _ = _run([CONFIGS / "inference.json"], "inferring", workflow_type="infer", **overrides)
    assert sorted(p.name for p in out.iterdir()) == ["s0_restored.nii", "s1_restored.nii"]
    network = workflow.parser.get_parsed_content("network")
    assert network.task == 2 and network.last_task.unique().tolist() == [2]  # every window used codebook 2


def test_later_stages_refuse_to_start_without_earlier_ones(dataset, tmp_path):
    overrides = {**TINY_TRAIN, "dataset_dir": str(dataset), "bundle_root": str(tmp_path)}
    for run_id, needed in (("training", ("stage1.pt", "stage2.pt")), ("train_stage2", ("stage1.pt",))):
        with pytest.raises(Exception) as info:
            _run([CONFIGS / "train.json"], run_id, **overrides)
        err = _missing_stage_error(info.value)
        assert err is not None, repr(info.value)
        for name in needed:
            assert str(tmp_path / "models" / name) in str(err)
        assert "python -m monai.bundle run train_stage1" in str(err)
    assert not (tmp_path / "models").exists()  # failed before training anything


def test_metadata_properties_and_export(dataset, tmp_path):
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    assert SCHEMA.is_file(), f"MONAI metadata schema missing at {SCHEMA}"
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    for config, kind in (("train.json", "train"), ("inference.json", "infer")):
        workflow = ConfigWorkflow(config_file=str(CONFIGS / config), workflow_type=kind, init_id="no_initialize",
                                  dataset_dir=str(dataset), bundle_root=str(tmp_path), **TINY_NET)
        workflow.initialize()
        assert workflow.check_properties() == [], (config, workflow.check_properties())
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY_NET))
    configs = [str(CONFIGS / "inference.json"), str(tiny)]
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=configs,
                      device="cpu", p=2, n=2, any=8)
    net = ConfigWorkflow(config_file=configs, workflow_type="infer").parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=configs, use_trace=True,
                input_shape=[1, 1, 32, 32])
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(1, 1, 32, 32)
    net.eval()
    with torch.no_grad():  # inference.json fixes the diffusion seed: the traced graph gives the same prior
        assert torch.allclose(exported(x), net(x), atol=1e-4)


@pytest.mark.slow
def test_multi_gpu_config_runs_all_stages_in_two_processes(dataset, tmp_path):
    """multi_gpu_train.json on top of train.json: the three stages under DDP (two gloo processes on the CPU)."""
    configs = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    args = []
    overrides = {**TINY_TRAIN, "batch_size": 4, "dataset_dir": str(dataset), "bundle_root": str(tmp_path)}
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    for run_id in ("train_stage1", "train_stage2", "training"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "monai.bundle", "run", run_id, "--config_file", configs, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, (run_id, proc.stderr[-3000:])
    for name in ("stage1.pt", "stage2.pt", "model.pt", "model_final.pt"):
        assert (tmp_path / "models" / name).is_file(), name
    final = torch.load(tmp_path / "models" / "model_final.pt", weights_only=True)
    stage1 = torch.load(tmp_path / "models" / "stage1.pt", weights_only=True)
    assert all(torch.equal(final[f"autoencoder.{k}"], v) for k, v in stage1.items())


# ---- engine pieces ------------------------------------------------------------------------------------------
def _tiny_model(**kwargs) -> DiffCode:
    torch.manual_seed(0)
    ae = dict(num_embeddings=8, embedding_dim=4, depth=2, channels=(4, 4), num_blocks=(1, 1))
    return DiffCode(autoencoder=ae, diffusion={"hidden_dim": 8}, channels=(4, 4, 4, 4), num_blocks=(1, 1, 1, 1),
                    classifier_channels=(4,), **kwargs)


def test_prepare_batches_pass_the_task_as_forward_kwarg():
    batch = {"lq": torch.rand(3, 1, 8, 8), "hq": torch.rand(3, 1, 8, 8), "task": torch.tensor([2, 0, 1])}
    lq, hq, args, kwargs = prepare_task_batch(batch)
    assert lq is batch["lq"] and hq is batch["hq"] and args == () and kwargs["task"].tolist() == [2, 0, 1]
    x, y, _, kwargs = prepare_hq_task_batch(batch)
    assert x is batch["hq"] and y is batch["hq"] and kwargs["task"].dtype == torch.int64
    with pytest.raises(KeyError, match="'task'"):
        prepare_task_batch({"lq": batch["lq"], "hq": batch["hq"]})

    model = _tiny_model()
    lq, z, _, kwargs = LatentTargetBatch(model.autoencoder)({**batch, "lq": torch.rand(3, 1, 7, 7),
                                                             "hq": torch.rand(3, 1, 7, 7)})
    assert lq.shape == (3, 1, 8, 8) and z.shape == (3, 4, 4, 4) and kwargs["z_hq"] is z and not z.requires_grad


def test_stage_losses():
    model = _tiny_model().train()
    lq, hq, task = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.tensor([0, 2])
    loss_fn = DiffCodeLoss(model)
    out = model(lq, task=task)
    loss = loss_fn(out, hq)
    assert torch.equal(loss, F.l1_loss(out, hq))  # stage III: Eq. 7, the L1 alone
    assert set(loss_fn.last_terms) == {"l1", "gate_max"} and 0.25 <= loss_fn.last_terms["gate_max"] <= 1.0

    stage1 = CodebookReconstruction(model.autoencoder.requires_grad_(True).train())
    recon = stage1(hq, task)
    loss = CodebookStageLoss(stage1)(recon, hq)
    assert torch.isclose(loss, F.l1_loss(recon, hq) + stage1.aux_loss)
    loss.backward()
    assert model.autoencoder.quantizer.codebooks.grad.abs().sum() > 0  # the codebook term trains the codes


def test_inference_and_validation_handlers_set_task_and_seed():
    model = _tiny_model()

    class _State:
        batch = [{"task": "ct_denoise"}]

    class _Engine:
        state = _State()

    ScanTaskHandler(model)(_Engine())
    assert model.task == 1
    seed = SampleSeedHandler(model, seed=5)
    seed._set(_Engine())
    assert model.sample_seed == 5
    seed._restore(_Engine())
    assert model.sample_seed is None


def test_require_stage_files_names_missing_files_and_commands(tmp_path):
    present = tmp_path / "stage1.pt"
    present.write_bytes(b"x")
    require_stage_files({"train_stage1": present})  # nothing missing: no error
    with pytest.raises(MissingStageError, match="stage2.pt") as info:
        require_stage_files({"train_stage1": present, "train_stage2": tmp_path / "stage2.pt"}, configs="c.json")
    assert "train_stage1" not in str(info.value).split("Train them first")[1]
    assert 'python -m monai.bundle run train_stage2 --config_file "c.json"' in str(info.value)
