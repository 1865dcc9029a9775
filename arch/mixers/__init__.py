"""Token mixers. Importing this package registers every built-in mixer."""

from arch.mixers import attention  # noqa: F401
