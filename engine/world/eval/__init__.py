"""Evaluations against ConceptWorld's ground truth: retrieval, labelling, steering."""
