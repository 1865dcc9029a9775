"""Test setup shared by every test: 8 fake CPU devices, so sharding is tested without hardware."""

import os

# Must happen before JAX is imported anywhere: XLA reads the flag once at start-up.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
