"""Presets (``tiny``, ``default``, ``quality``): one YAML file each, one section per stage. Read with
:func:`mg3d.config.load_preset`."""
