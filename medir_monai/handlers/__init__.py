"""medir_monai.handlers."""
