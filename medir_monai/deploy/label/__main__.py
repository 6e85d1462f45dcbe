"""The ``monailabel`` command with the pydicom-seg alias applied first (MONAI Label 0.8.5 under pydicom 3).

``monailabel start_server`` imports pydicom-seg before it loads any app, so the alias set in ``main.py`` comes too
late for the server; start it through this module instead (same arguments, ``--workers 1``, the default)::

    python -m medir_monai.deploy.label start_server --app medir_monai/deploy/label --studies STUDIES \\
        --conf models amir --conf task ct_denoise
"""

from __future__ import annotations

from medir_monai.deploy.label.core import ensure_pydicom_seg_compat


def main() -> None:
    """Apply :func:`~medir_monai.deploy.label.core.ensure_pydicom_seg_compat`, then run MONAI Label's command line."""
    ensure_pydicom_seg_compat()
    from monailabel.main import Main

    Main().run()


if __name__ == "__main__":
    main()
