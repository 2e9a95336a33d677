"""torchtitan config for benchmarks/vs_torchtitan.py's rows at another vocabulary (see config_registry)."""
