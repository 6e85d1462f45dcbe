"""medir-monai: all-in-one medical image restoration (MRI SR, low-dose CT, low-dose PET) on MONAI."""

from .tasks import TASKS, Task, get_task, task_names

__version__ = "0.1.0"
__all__ = ["TASKS", "Task", "get_task", "task_names", "__version__"]
