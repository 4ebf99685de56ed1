"""Atlases in: importers of SAE and matrix formats, label files, and text lookup over concept labels."""
