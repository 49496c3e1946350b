"""``mg3d.bench``: device runners, latency and on-device quality, and the sweeps that pick a student per
device."""
