"""medir_monai.data."""
