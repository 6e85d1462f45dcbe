"""Make the inputs of ``scripts/deploy_envs.sh``: a CT DICOM series, the same volume as NIfTI, an exported model.

The CT slices are quarter-dose LQ slices (HU) of the corpus's CT test patient, built from the wheels into
``<out>/corpus`` (:func:`ct_slices`). The same slices are also written as a second series,
``ct_series_fine``, whose header claims 0.1 mm pixels: a scan outside the model's training data, on which the apps
must pass the input guard's warning on. The model is the AMIR bundle's shipped weights (``configs/pretrained.json``)
exported to TorchScript with :func:`medir_monai.deploy.export.export_torchscript` at the bundle's patch size, with
their restoration settings and training profile in the metadata (an untrained tiny AMIR if none ship).

Usage::

    python scripts/make_deploy_demo.py --out DEMO_DIR [--slices 3] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[1]
PIXEL_MM = 0.8
SLICE_MM = 2.5
FINE_PIXEL_MM = 0.1  # far below any CT pixel size in training: the input guard must warn
TINY_CONFIG = {"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1], "network_def#num_refinement_blocks": 1}


def ct_slices(count: int, size: int, corpus: Path) -> tuple[np.ndarray, str]:
    """``(size, size, count)`` HU volume (MONAI index order) of the corpus's CT test source and where it came from.

    The slices are quarter-dose LQ slices of the test patient (``head1149``), built into ``corpus`` with
    :func:`medir_monai.data.demo.ensure_demo_dataset` (CT only, ``count`` slices per source; nothing downloaded).
    """
    from medir_monai.data.demo import ensure_demo_dataset

    root = ensure_demo_dataset(corpus, max_slices=count, tasks=("ct_denoise",))
    folder = root / "CT" / "test" / "LQ"
    files = sorted(folder.glob("*.nii*"))[:count]
    if len(files) < count:
        raise SystemExit(f"{folder}: {len(files)} CT test slices, {count} wanted")
    planes = [np.asarray(nib.load(str(f)).get_fdata(dtype=np.float32)).squeeze() for f in files]
    start = (planes[0].shape[0] - size) // 2
    volume = np.stack([p[start:start + size, start:start + size] for p in planes], axis=-1)
    return volume.astype(np.float32), f"{folder} ({', '.join(f.name for f in files)}), central {size}x{size}"


def write_series(volume: np.ndarray, folder: Path, pixel_mm: float = PIXEL_MM) -> None:
    """One CT file per slice: int16 HU (slope 1, intercept 0), ``pixel_mm`` pixels, 2.5 mm slices."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k in range(volume.shape[-1]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Demo^Restore", "DEMO-1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyDate, ds.SeriesDate, ds.SeriesTime = "20240102", "20240102", "110000"
        ds.SeriesNumber, ds.SeriesDescription = 3, "quarter dose demo"
        ds.ImageType, ds.InstanceNumber = ["ORIGINAL", "PRIMARY", "AXIAL"], k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -100.0, SLICE_MM * k]
        ds.PixelSpacing, ds.SliceThickness = [pixel_mm, pixel_mm], SLICE_MM
        hu = np.clip(np.round(volume[..., k].T), -32768, 32767).astype(np.int16)  # (rows, columns)
        ds.set_pixel_data(hu, "MONOCHROME2", 16, generate_instance_uid=False)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "0", "HU"
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)


def export_model(out: Path) -> tuple[Path, str]:
    from medir_monai.deploy.export import export_torchscript
    from medir_monai.deploy.models import load_bundle_network
    from medir_monai.weights import shipped_models

    bundle = REPO_ROOT / "bundles" / "amir"
    if "amir" in shipped_models():
        net, info = load_bundle_network(bundle, config_files=[bundle / "configs" / "pretrained.json"])
        origin = f"AMIR shipped weights {info['checkpoint']} (configs/pretrained.json), with their training profile"
    else:
        tiny = out / "tiny.json"
        tiny.write_text(json.dumps({**TINY_CONFIG, "patch_size": [64, 64]}))
        torch.manual_seed(0)
        net, info = load_bundle_network(bundle, config_files=[tiny], untrained=True)
        origin = "untrained tiny AMIR (this install ships no AMIR weights)"
    path = export_torchscript(net, out / "amir.ts", (1, 1, *info["roi_size"]), model_name=info["model_name"],
                              deployment=info)
    return path, f"{origin}, traced at {info['roi_size']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to create the demo inputs in")
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--size", type=int, default=256, help="in-plane size (central crop of the 512x512 demo slices)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    volume, origin = ct_slices(args.slices, args.size, out / "corpus")
    write_series(volume, out / "ct_series")
    write_series(volume, out / "ct_series_fine", pixel_mm=FINE_PIXEL_MM)
    studies = out / "studies"
    studies.mkdir(exist_ok=True)
    affine = np.diag([-PIXEL_MM, -PIXEL_MM, SLICE_MM, 1.0])
    nib.Nifti1Image(volume, affine).to_filename(str(studies / "ct_volume.nii.gz"))
    fine = np.diag([-FINE_PIXEL_MM, -FINE_PIXEL_MM, SLICE_MM, 1.0])
    nib.Nifti1Image(volume, fine).to_filename(str(studies / "ct_volume_fine.nii.gz"))
    model, model_origin = export_model(out)
    print(f"CT series    {out / 'ct_series'}: {volume.shape[-1]} slices of {volume.shape[0]}x{volume.shape[1]} from {origin}")
    print(f"CT series    {out / 'ct_series_fine'}: the same slices labelled {FINE_PIXEL_MM} mm pixels (outside training)")
    print(f"NIfTI volume {studies / 'ct_volume.nii.gz'}: HU range [{volume.min():.0f}, {volume.max():.0f}]")
    print(f"model        {model}: {model_origin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
