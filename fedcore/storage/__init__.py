"""Disk: atomic files, safetensors codecs, provisioned key files."""
