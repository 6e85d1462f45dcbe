"""Copy a bundle's trained ``pretrained.json`` model into the package (``medir_monai/weights/``) and record it.

Run after ``python -m monai.bundle run training --config_file "['bundles/NAME/configs/train.json',
'bundles/NAME/configs/pretrained.json']"`` has written ``bundles/NAME/models/pretrained/model.pt``::

    python scripts/ship_weights.py amir
    python scripts/ship_weights.py tat --dtype float16      # a file over 25 MB in float32

The weights (and the training profile the input guard reads) are written atomically to
``medir_monai/weights/NAME.pt``; ``MANIFEST.json`` records the file's sha256, size and storage dtype. With
``--dtype float16`` the script restores the first test slice of every task of the dataset with the float32 and
the float16 weights and prints the largest difference (physical units) and both PSNRs, so the card can say what
half-precision storage costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from medir_monai.atomic import atomic_save, atomic_write_bytes
from medir_monai.weights import MANIFEST_NAME, MAX_FILE_BYTES, WEIGHTS_DIR, manifest, sha256_of

REPO = Path(__file__).resolve().parents[1]


def _cast(state: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state.items()}


def _compare_precision(name: str, full: Path, half: Path) -> list[str]:
    """Restore one test slice per task with both files; lines of max |difference| and PSNR against HQ."""
    from monai.bundle import ConfigParser

    from medir_monai.data import load_image, prepare_dataset_dir
    from medir_monai.deploy.models import load_bundle_network
    from medir_monai.restore import restore_array
    from medir_monai.metrics import paper_metrics
    from medir_monai.tasks import TASKS

    bundle = REPO / "bundles" / name
    config = bundle / "configs" / "pretrained.json"
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "inference.json"), str(config)])
    root = Path(prepare_dataset_dir(parser.get_parsed_content("dataset_dir")))
    settings = {"roi_size": parser["patch_size"], "intensity_reference": parser.get("intensity_reference"),
                "safeguard": parser.get("safeguard"), "progress": False}
    nets = [load_bundle_network(bundle, [config], checkpoint=ckpt)[0] for ckpt in (full, half)]
    lines = []
    for task in TASKS.values():
        lq_files = sorted((root / task.folder / "test" / "LQ").glob("*.nii.gz"))
        if not lq_files:
            continue
        lq = load_image(lq_files[0])
        hq = load_image(lq_files[0].parent.parent / "HQ" / lq_files[0].name)
        with torch.no_grad():
            outs = [restore_array(net, lq, task.name, **settings) for net in nets]
        diff = float((torch.as_tensor(outs[0]) - torch.as_tensor(outs[1])).abs().max())
        psnrs = [float(paper_metrics(torch.as_tensor(o), torch.as_tensor(hq), task, normalised=False)["psnr"])
                 for o in outs]
        lines.append(f"{task.name} {lq_files[0].name}: max |float32 - float16| = {diff:.4g} {task.unit}; "
                     f"PSNR {psnrs[0]:.3f} (float32) / {psnrs[1]:.3f} (float16) dB")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="bundle / model name: amir, tat or restormer")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    parser.add_argument("--checkpoint", help="default: bundles/NAME/models/pretrained/model.pt")
    args = parser.parse_args(argv)

    source = Path(args.checkpoint or REPO / "bundles" / args.name / "models" / "pretrained" / "model.pt")
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "training_profile" not in checkpoint:
        print(f"ship_weights: error: {source}: no training profile recorded (train with pretrained.json)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    target = WEIGHTS_DIR / f"{args.name}.pt"
    atomic_save({"model": _cast(checkpoint["model"], dtype), "training_profile": checkpoint["training_profile"]}, target)
    size = target.stat().st_size
    if size >= MAX_FILE_BYTES:
        target.unlink()
        print(f"ship_weights: error: {target} would be {size / 1e6:.1f} MB (limit 25 MB); use --dtype float16",
              file=sys.stderr)
        return 2
    parameters = sum(v.numel() for v in checkpoint["model"].values() if torch.is_floating_point(v))
    entries = manifest()
    entries[args.name] = {
        "file": target.name,
        "sha256": sha256_of(target),
        "bytes": size,
        "dtype": args.dtype,
        "parameters": parameters,
        "config": f"bundles/{args.name}/configs/pretrained.json",
        "card": f"bundles/{args.name}/docs/model_card.md",
        "shipped": datetime.date.today().isoformat(),
    }
    atomic_write_bytes(WEIGHTS_DIR / MANIFEST_NAME, (json.dumps(entries, indent=2, sort_keys=True) + "\n").encode())
    print(f"{target}: {size / 1e6:.2f} MB, {parameters:,} values, {args.dtype}, sha256 {entries[args.name]['sha256']}")
    if dtype != torch.float32:
        for line in _compare_precision(args.name, source, target):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
