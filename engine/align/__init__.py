"""Alignment: the map, streaming sufficient statistics, fitting methods, pairing, corpus, the fit pass."""
