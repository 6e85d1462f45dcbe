"""MONAI transforms for medical image degradation (installed as ``medir_monai.transforms``)."""
