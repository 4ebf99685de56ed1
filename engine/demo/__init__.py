"""The demo: the whole mission on ConceptWorld, and its report."""
