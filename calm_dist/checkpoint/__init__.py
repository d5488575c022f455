"""Checkpoints: the on-disk format (meta.json, manifest, `latest`; `manager.py` writes and resumes
them, `integrity.py` checks them), reading one back for consolidation (`reading.py`), and the
config.json of a converted directory (`hf_config.py`). Training, the inference loader and the
converter all build on it; it depends on none of them."""
