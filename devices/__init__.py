"""Device profiles for ``mg3d bench``: one YAML file per device (transport, runtime, threads, target FPS)."""
