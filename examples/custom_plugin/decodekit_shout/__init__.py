"""An example decodekit plugin package (see plugin.py)."""
