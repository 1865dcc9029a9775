"""Token mixers. Importing this package registers every built-in mixer."""

from arch.mixers import attention  # noqa: F401
from arch.mixers import base_conv  # noqa: F401
from arch.mixers import linear_attention  # noqa: F401
from arch.mixers import titans  # noqa: F401
