"""Bulk labelling: feature sources, the resumable run, exports."""
