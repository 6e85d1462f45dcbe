"""medir_monai.engines."""
